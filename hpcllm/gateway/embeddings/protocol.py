"""Wire types of POST /v1/embeddings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hpcllm.gateway.protocol import InputsRequest, OpenAIResponse, unsupported


class EmbeddingRequest(InputsRequest):
    # "base64": the float32 little-endian bytes, base64-encoded (what the openai client asks for by default).
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def check_supported(self) -> None:
        if self.dimensions is not None:
            raise unsupported("dimensions", "shortening embeddings (dimensions)")


class Embedding(OpenAIResponse):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(OpenAIResponse):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
