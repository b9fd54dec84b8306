"""Per-API-key request and token limits (token buckets in SharedState, so all gateway processes share them).

Each key has two buckets: requests (capacity requests_per_minute, refilled continuously at rpm/60 per second,
cost 1 per request that uses a model: a route marked @uses_model) and tokens (capacity tokens_per_minute; a request
reserves prompt_tokens + max_tokens up front and gets back what its generation did not use when it ends). An empty
bucket means 429 with Retry-After set to the seconds until the request would fit; a request reserving more than the
whole bucket is a 429 at once.
Each key may also hold a bounded number of streams at once (stream slots, shared by all gateway processes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from hpcllm.config import ApiKey
from hpcllm.gateway.errors import RateLimited
from hpcllm.gateway.shared_state import SharedState


STREAM_RETRY_AFTER_S = 2.0
_USES_MODEL = "hpcllm_uses_model"


def uses_model(view: Callable) -> Callable:
    """Marks a route whose requests use a model (generation, embeddings, scoring, the model's tokenizer): each takes
    one token of its key's requests bucket, batch lines too (they run through the same routes). Reads and management
    (models, files, batches, stored responses, conversations, status) do not, so a key whose budget a running batch
    or a loop of requests uses up still sees its progress."""
    setattr(view, _USES_MODEL, True)
    return view


def counts_as_request(view: Callable | None) -> bool:
    return getattr(view, _USES_MODEL, False)


def key_digest(key: ApiKey) -> str:
    """What the limits database names a key by (its buckets, the owner of its stored responses): a digest of the
    key, never the key itself."""
    return hashlib.sha256(key.key.encode()).hexdigest()[:24]


def _bucket_id(key: ApiKey, kind: str) -> str:
    return f"{kind}:{key_digest(key)}"


class RateLimiter:
    def __init__(self, state: SharedState):
        self.state = state

    def take_request(self, key: ApiKey) -> None:
        rpm = key.requests_per_minute
        wait = self.state.take(_bucket_id(key, "requests"), capacity=rpm, per_second=rpm / 60.0, cost=1)
        if wait is not None:
            raise RateLimited(
                f"Rate limit reached for key {key.name!r}: {rpm} requests per minute; retry in {wait:.1f} s",
                code="rate_limit_exceeded", retry_after=wait)

    def reserve_tokens(self, key: ApiKey, tokens: int) -> None:
        tpm = key.tokens_per_minute
        if tokens > tpm:  # would never fit: no Retry-After, the request itself must shrink
            raise RateLimited(
                f"Request too large for key {key.name!r}: it reserves {tokens} tokens (prompt + max_tokens, per "
                f"prompt), more than the key's whole budget of {tpm} tokens per minute; lower max_tokens or send "
                f"fewer prompts per request", code="request_over_token_limit")
        wait = self.state.take(_bucket_id(key, "tokens"), capacity=tpm, per_second=tpm / 60.0, cost=tokens)
        if wait is not None:
            raise RateLimited(
                f"Token limit reached for key {key.name!r}: {tpm} tokens per minute (this request reserves "
                f"{tokens} = prompt + max_tokens); retry in {wait:.1f} s or lower max_tokens",
                code="tokens_limit_exceeded", retry_after=wait)

    def open_stream(self, key: ApiKey, stream_id: str, limit: int) -> None:
        """Take one of the key's `limit` stream slots until close_stream(stream_id); 429 when all are taken."""
        if not self.state.open_stream(_bucket_id(key, "streams"), stream_id, limit):
            raise RateLimited(
                f"Too many concurrent streams for key {key.name!r}: at most {limit} at once; retry when one ends",
                code="too_many_streams", retry_after=STREAM_RETRY_AFTER_S)

    def close_stream(self, stream_id: str) -> None:
        self.state.close_stream(stream_id)

    def settle_tokens(self, key: ApiKey, reserved: int, used: int) -> None:
        """After a request: give back reserved - used (or charge the excess when it used more than reserved)."""
        tpm = key.tokens_per_minute
        self.state.refund(_bucket_id(key, "tokens"), capacity=tpm, per_second=tpm / 60.0, amount=reserved - used)
