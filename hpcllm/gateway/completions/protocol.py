"""Wire types of POST /v1/completions (OpenAI's legacy completions API)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import (OpenAIResponse, PromptLogprobs, SamplingRequest, UsageInfo, prompt_list,
                                     unsupported)

class CompletionRequest(SamplingRequest):
    # After validation: a list of prompts, each a str or a list of token ids (one choice per prompt).
    prompt: Any
    # 0 only with echo: the answer is the prompt alone (vLLM generates one token and drops it).
    max_tokens: int | None = Field(None, ge=0)
    # Prepend the prompt to each choice's text; with logprobs, its tokens' log probabilities lead the choice's.
    echo: bool | None = False
    suffix: str | None = None
    # Generate best_of choices per prompt and return the n with the highest cumulative log probability (vLLM).
    best_of: int | None = Field(None, ge=1, le=128)
    # Return the sampled tokens' log probabilities and this many most likely alternatives per token (vLLM: <= 20).
    logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's: a text prompt is tokenized with the tokenizer's special tokens (its BOS); a token-id prompt as sent.
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: Any) -> list[str | list[int]]:
        return prompt_list(value, "prompt")

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens must be at least 1, got 0 (0 is only allowed with echo)",
                                 param="max_tokens", code="invalid_value")
        if self.suffix:
            raise unsupported("suffix", "a suffix (insertion)")
        if self.thinking_budget is not None:  # whether a raw prompt leaves the model thinking is the template's
            raise unsupported("thinking_token_budget", "a thinking budget on completions (send it to "
                                                       "/v1/chat/completions, whose template opens the thinking)")
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise InvalidRequest(f"best_of ({self.best_of}) must be at least n ({self.choices_per_prompt})",
                                 param="best_of", code="invalid_value")
        if self.stream and self.generated_per_prompt > self.choices_per_prompt:
            raise unsupported("best_of", "streaming with best_of > n (the best choices are known only at the end)")

    @property
    def generated_per_prompt(self) -> int:
        """Choices generated per prompt: best_of of them, of which n are returned."""
        return max(self.best_of or 1, self.choices_per_prompt)

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt alone is the answer (the one token generated is dropped)."""
        return bool(self.echo) and self.max_tokens == 0

    @property
    def worker_prompt_logprobs(self) -> int | None:
        """The alternatives per prompt token the worker must report: echo's logprobs cover the prompt too (vLLM),
        as prompt_logprobs asks."""
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(wanted) if wanted else None

    @property
    def worker_logprobs(self) -> int | None:
        """What the worker must report: best_of ranks choices by their tokens' log probabilities."""
        if self.generated_per_prompt > self.choices_per_prompt:
            return self.logprobs or 0
        return self.logprobs


class CompletionLogprobs(OpenAIResponse):
    """OpenAI's legacy logprobs object: parallel lists, one entry per generated token."""

    text_offset: list[int] = Field(default_factory=list)  # where each token's text starts in the choice's text
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    # vLLM's: the stop string (or stop token id) that ended the choice; null otherwise (an end of sequence, length)
    stop_reason: str | int | None = None


class CompletionResponseChoice(CompletionChoice):
    """A whole answer's choice (vLLM's): its prompt's prompt_logprobs, when they were asked for."""

    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
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
