"""OpenAI's Batch API (/v1/batches): a JSONL file of requests run offline, each through the same serving code as
its HTTP endpoint, by exactly one gateway process at a time (a lease in the limits database)."""
