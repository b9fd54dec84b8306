"""Wire types of POST /v1/chat/completions."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import OpenAIRequest, OpenAIResponse, SamplingRequest, UsageInfo, unsupported

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(OpenAIRequest):
    role: Role
    # A string, or a list of content parts ({"type": "text", "text": ...}; other part types are rejected later).
    content: Any = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _content_shape(cls, value: Any, info: ValidationInfo) -> str | list[dict] | None:
        if value is None:
            role = info.data.get("role")  # absent when the role itself was invalid: that error is the one to report
            if role is not None and role != "assistant":  # as OpenAI: only an assistant's (tool-calling) may be none
                raise ValueError(f"a {role} message needs content")
            return value
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in value):
            return value
        raise ValueError("content must be a string or a list of content parts like {\"type\": \"text\", \"text\": ...}")

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part["type"] != "text":
                raise unsupported(f"{where}.content[{i}].type", f"content of type {part['type']!r}")
            if not isinstance(part.get("text"), str):
                raise unsupported(f"{where}.content[{i}].text", "a text part without a string 'text'")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens; wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs",
                                 code="invalid_value")
        if self.tools or self.functions:
            raise unsupported("tools" if self.tools else "functions", "tool / function calling")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", f"response_format {self.response_format.get('type')!r}")
        for i, message in enumerate(self.messages):
            if message.tool_calls:
                raise unsupported(f"messages[{i}].tool_calls", "tool calls")

    @property
    def worker_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them (role + string content); 'developer' is the newer 'system'."""
        out = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": message.text(f"messages[{i}]")})
        return out


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatTopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIResponse):
    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class ChatChoice(OpenAIResponse):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIResponse):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIResponse):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None

    def to_sse_json(self, include_usage: bool) -> str:
        """OpenAI's chunk shape: delta carries only the fields that are set; usage is there only when asked."""
        body = self.model_dump(exclude=None if include_usage else {"usage"})
        for choice, model in zip(body["choices"], self.choices):
            choice["delta"] = model.delta.model_dump(exclude_none=True)
        return json.dumps(body, separators=(",", ":"))
