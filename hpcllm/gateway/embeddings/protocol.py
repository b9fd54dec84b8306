"""Wire types of POST /v1/embeddings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from hpcllm.gateway.protocol import OpenAIRequest, OpenAIResponse, prompt_list, unsupported


class EmbeddingRequest(OpenAIRequest):
    model: str = Field(min_length=1)
    # After validation: a list of inputs, each a str or a list of token ids (one embedding per input).
    input: Any
    # "base64": the float32 little-endian bytes, base64-encoded (what the openai client asks for by default).
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_list(cls, value: Any) -> list[str | list[int]]:
        return prompt_list(value, "input")

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
