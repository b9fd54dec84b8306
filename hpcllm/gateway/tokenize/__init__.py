"""tokenize / detokenize endpoints of the gateway (vLLM's extra API)."""
