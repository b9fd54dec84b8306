"""Wire types of POST /v1/classify (vLLM's ClassificationCompletionRequest and ClassificationResponse)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from hpcllm.gateway.protocol import OpenAIRequest, OpenAIResponse, UsageInfo, prompt_list, unsupported


class ClassificationRequest(OpenAIRequest):
    model: str = Field(min_length=1)
    # After validation: a list of inputs, each a str or a list of token ids (one classification per input).
    input: Any
    use_activation: bool | None = None  # softmax (sigmoid for one label); None: the model's default, on
    truncate_prompt_tokens: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_list(cls, value: Any) -> list[str | list[int]]:
        return prompt_list(value, "input")

    def check_supported(self) -> None:
        if self.truncate_prompt_tokens is not None:
            raise unsupported("truncate_prompt_tokens", "truncating inputs")


class ClassificationData(OpenAIResponse):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIResponse):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageInfo
