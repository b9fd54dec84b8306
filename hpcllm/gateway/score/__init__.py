"""POST /v1/score and /v1/rerank (/v2/rerank, /score, /rerank): vLLM's scoring APIs on the model's worker."""
