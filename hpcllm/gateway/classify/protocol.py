"""Wire types of POST /v1/classify (vLLM's ClassificationCompletionRequest and ClassificationResponse)."""

from __future__ import annotations

from typing import Literal

from hpcllm.gateway.protocol import InputsRequest, OpenAIResponse, UsageInfo


class ClassificationRequest(InputsRequest):
    use_activation: bool | None = None  # softmax (sigmoid for one label); None: the model's default, on
    user: str | None = None


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
