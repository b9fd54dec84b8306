"""Wire types of POST /v1/completions (OpenAI's legacy completions API)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from hpcllm.gateway.protocol import OpenAIResponse, SamplingRequest, UsageInfo, unsupported

PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


class CompletionRequest(SamplingRequest):
    # After validation: a list of prompts, each a str or a list of token ids (one choice per prompt).
    prompt: Any
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            return [value]
        if _is_token_ids(value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
            return value
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        raise ValueError(f"prompt must be {PROMPT_SHAPES}")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", "echoing the prompt")
        if self.suffix:
            raise unsupported("suffix", "a suffix (insertion)")
        if self.best_of is not None and self.best_of > 1:
            raise unsupported("best_of", "best_of > 1")
        if self.logprobs is not None:
            raise unsupported("logprobs", "returning log probabilities")


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
