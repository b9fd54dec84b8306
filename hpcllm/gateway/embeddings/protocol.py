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
    # vLLM's: base64's byte order ("native" is the server's, little-endian here) and its number type (both ignored
    # for "float", as vLLM ignores them).
    endianness: Literal["native", "little", "big"] = "native"
    embed_dtype: str = "float32"
    # vLLM's switch off the L2 normalization (normalize: its older name, which vLLM 0.32 refuses); the worker
    # always normalizes, so only the neutral value is taken.
    use_activation: bool | None = None
    normalize: bool | None = None

    def check_supported(self) -> None:
        if self.dimensions is not None:
            raise unsupported("dimensions", "shortening embeddings (dimensions)")
        if self.embed_dtype != "float32" and self.encoding_format == "base64":
            raise unsupported("embed_dtype", f"base64 embeddings as {self.embed_dtype!r} (only float32)")
        for field in ("use_activation", "normalize"):
            if getattr(self, field) is False:
                raise unsupported(field, "embeddings without L2 normalization")


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
