"""POST /v1/embeddings: tokenize, route to the model's worker, embed (final hidden state of the last token,
L2-normalized: vLLM's default pooling for decoder models), answer in OpenAI's shape.

pooling_model, tokenize_input and embed_on_a_worker are also the score and rerank APIs' way to the embeddings
(hpcllm.gateway.score)."""

from __future__ import annotations

import base64
import struct

from hpcllm.gateway.embeddings.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.routing import Endpoint, ModelCard
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import RequestContext, on_a_worker
from hpcllm.gateway.tokenization import PromptEncoder
from hpcllm.gateway.upstream import embed_on_worker


def create_embedding(gw: Gateway, ctx: RequestContext, req: EmbeddingRequest) -> dict:
    req.check_supported()
    card = pooling_model(gw, req.model, "embeddings")
    encoder = gw.tokenizers.get(card)
    inputs = [tokenize_input(encoder, card, text_or_ids, "input" if len(req.input) == 1 else f"input[{i}]")
              for i, text_or_ids in enumerate(req.input)]
    embeddings = embed_on_a_worker(gw, ctx, card, inputs)
    prompt_tokens = sum(len(ids) for ids in inputs)
    return EmbeddingResponse(
        data=[Embedding(embedding=_encode(e, req.encoding_format), index=i) for i, e in enumerate(embeddings)],
        model=req.model, usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    ).model_dump()


def pooling_model(gw: Gateway, model: str, api: str) -> ModelCard:
    """The card of a model that `api` (what the error calls it: "embeddings", "scores") may run on: a LoRA adapter
    is refused naming its base model (pooling runs the base model's weights only)."""
    card = gw.router.get_model(model)
    if card.lora is not None:
        raise InvalidRequest(f"model {model!r} is a LoRA adapter of {card.parent!r}: {api} are served by models, "
                             f"not adapters; ask {card.parent!r}", param="model")
    return card


def tokenize_input(encoder: PromptEncoder, card: ModelCard, text_or_ids: str | list[int], param: str) -> list[int]:
    """The token ids of one input (BOS added as vLLM does), or a 400 naming param: empty, outside the vocabulary,
    or longer than the model's context."""
    if isinstance(text_or_ids, str):  # a text too long for the context whatever its tokens: refused untokenized
        encoder.check_fits(len(text_or_ids), card.max_model_len, param)
    ids = encoder.encode(text_or_ids) if isinstance(text_or_ids, str) else encoder.check_token_ids(text_or_ids, param)
    if not ids:
        raise InvalidRequest("the input is empty (no tokens after tokenization)", param=param, code="empty_prompt")
    if card.max_model_len is not None and len(ids) > card.max_model_len:
        raise InvalidRequest(f"This model's maximum context length is {card.max_model_len} tokens. However, "
                             f"the input has {len(ids)} tokens. Please reduce the length of the input.",
                             param=param, code="context_length_exceeded")
    return ids


def embed_on_a_worker(gw: Gateway, ctx: RequestContext, card: ModelCard, inputs: list[list[int]]) -> list[list[float]]:
    """The inputs' embeddings from one worker call (another worker if the routed one is gone), their tokens taken
    from the key's token budget and counted as the request's prompt tokens (metrics, usage accounting)."""
    prompt_tokens = sum(len(ids) for ids in inputs)
    if ctx.api_key is not None:
        gw.limiter.reserve_tokens(ctx.api_key, prompt_tokens)

    def route() -> Endpoint:
        return gw.router.resolve(card.name, gw.config.gateway.route_timeout_seconds,
                                 group=ctx.api_key.group if ctx.api_key else None)

    def embed(endpoint: Endpoint) -> list[list[float]]:
        return embed_on_worker(gw.http, endpoint.worker_url, endpoint.key(gw.config.cluster.shared_secret), inputs)

    try:
        _, embeddings = on_a_worker(gw, ctx, route(), route, embed)  # a worker that died meanwhile: another
    except BaseException:
        if ctx.api_key is not None:
            gw.limiter.settle_tokens(ctx.api_key, prompt_tokens, 0)
        raise
    gw.metrics.prompt_tokens.labels(card.name).inc(prompt_tokens)
    gw.usage.record(ctx.api_key, card.name, ctx.endpoint, prompt_tokens, 0)
    return embeddings


def _encode(embedding: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return embedding
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode()
