"""OpenAI's Files API (/v1/files): the JSONL inputs of batches and the output files they produce.

Kept import-light (the front door's template reads MULTIPART_OVERHEAD)."""

# Room for the multipart framing and the purpose field around an uploaded file itself.
MULTIPART_OVERHEAD = 64 * 1024
