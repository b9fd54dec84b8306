"""POST /v1/embeddings: OpenAI's embeddings API on the model's worker (last-token pooling, as vLLM)."""
