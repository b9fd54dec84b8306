"""OpenAI's Files API (/v1/files): the JSONL inputs of batches and the output files they produce.

Kept import-light (the front door's template reads MULTIPART_OVERHEAD, `hpcllm batch` the expiry bounds and
PAGE_MAX)."""

# Room for the multipart framing and the purpose field around an uploaded file itself.
MULTIPART_OVERHEAD = 64 * 1024
# OpenAI's bounds on a file's expires_after (and a batch's output_expires_after): an hour to 30 days.
EXPIRES_MIN_S, EXPIRES_MAX_S = 3600, 30 * 24 * 3600
# OpenAI's bound on one page of a batch list (GET /v1/batches' `limit`).
PAGE_MAX = 100
