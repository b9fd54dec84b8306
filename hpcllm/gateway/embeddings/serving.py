"""POST /v1/embeddings: tokenize, route to the model's worker, embed (final hidden state of the last token,
L2-normalized: vLLM's default pooling for decoder models), answer in OpenAI's shape."""

from __future__ import annotations

import base64
import struct

from hpcllm.gateway.embeddings.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.pooling import (classifier_of, embedding_models, pool_on_a_worker, requested_pooling_model,
                                    tokenize_inputs)
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import RequestContext


def create_embedding(gw: Gateway, ctx: RequestContext, req: EmbeddingRequest) -> dict:
    req.check_supported()
    card = requested_pooling_model(gw, req.model, "embeddings", embedding_models)
    classifier = classifier_of(card)
    if classifier is not None:
        raise InvalidRequest(f"model {card.name!r} is a classification model ({classifier.architecture}): it answers "
                             "/v1/score, /v1/rerank and /v1/classify, not /v1/embeddings", param="model")
    encoder = gw.tokenizers.get(card)
    embeddings, prompt_tokens = pool_on_a_worker(gw, ctx, card, tokenize_inputs(encoder, card, req), None)
    return EmbeddingResponse(
        data=[Embedding(embedding=_encode(e, req.encoding_format, req.endianness), index=i)
              for i, e in enumerate(embeddings)],
        model=card.name, usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    ).model_dump()


def _encode(embedding: list[float], encoding_format: str, endianness: str) -> list[float] | str:
    if encoding_format == "float":
        return embedding
    order = ">" if endianness == "big" else "<"
    return base64.b64encode(struct.pack(f"{order}{len(embedding)}f", *embedding)).decode()
