"""POST /v1/classify: vLLM's classification API on a *ForSequenceClassification model's worker."""
