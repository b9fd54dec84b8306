"""OpenAI's Batch API (/v1/batches): a JSONL file of requests run offline, each through the same serving code as
its HTTP endpoint, by exactly one gateway process at a time (a lease in the limits database).

Kept import-light (no Flask, no pydantic): `hpcllm batch` reads the endpoints and statuses from here."""

from typing import Literal, get_args

# What a batch may run: OpenAI's endpoints this gateway serves, and vLLM's scoring ones (its run_batch takes score
# and rerank: reranking a corpus offline; classify, served as they are, labels one the same way).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/score", "/v1/rerank",
             "/v1/classify")

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
# Statuses a runner still has work in (a claimable batch).
ACTIVE = ("in_progress", "finalizing", "cancelling")
# The statuses a batch ends in: the rest, but OpenAI's validating, which this gateway never has (it checks the
# input file in the create call itself).
FINAL = tuple(status for status in get_args(BatchStatus) if status not in (*ACTIVE, "validating"))
