"""Wire types of POST /tokenize and POST /detokenize (vLLM's shapes: a client written for vLLM reads ours)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from hpcllm.gateway.protocol import OpenAIRequest, OpenAIResponse


# The fields of /v1/chat/completions that change how the chat template renders messages.
CHAT_TEMPLATE_FIELDS = ("chat_template_kwargs", "continue_final_message", "documents", "chat_template",
                        "reasoning_effort")


class TokenizeRequest(OpenAIRequest):
    # Optional as in vLLM: none names the gateway's only model (lm-eval's remote tokenizer sends none).
    model: str | None = Field(None, min_length=1)
    # One of: a plain prompt, or chat messages (and tools) rendered through the model's chat template - checked as
    # /v1/chat/completions checks them.
    prompt: str | None = None
    messages: list[Any] | None = Field(None, min_length=1)
    tools: list[Any] | None = None
    add_generation_prompt: bool = True
    # With messages: the chat template fields of /v1/chat/completions (ChatCompletionRequest), checked as it does.
    chat_template_kwargs: Any = None
    continue_final_message: Any = None
    documents: Any = None
    chat_template: Any = None
    reasoning_effort: Any = None
    # vLLM's defaults: the model's BOS for a prompt, none for messages (the template holds its special tokens).
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        if self.messages is None and (self.tools is not None or self.chat_fields()):
            raise ValueError(f"'{next(iter(self.chat_fields()), 'tools')}' needs 'messages'")
        return self

    def chat_fields(self) -> dict[str, Any]:
        """The chat template fields given (the chat request's defaults for the others)."""
        return {name: getattr(self, name) for name in CHAT_TEMPLATE_FIELDS if getattr(self, name) is not None}


class TokenizeResponse(OpenAIResponse):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIRequest):
    model: str | None = Field(None, min_length=1)
    tokens: list[int]


class DetokenizeResponse(OpenAIResponse):
    prompt: str


class TokenizerInfoResponse(OpenAIResponse):
    """GET /tokenizer_info: vLLM's fields that clients read (lm-eval's remote tokenizer: the special tokens and the
    chat template), not vLLM's whole tokenizer_config.json, which holds the checkpoint's path and can run to
    megabytes of added tokens."""

    model: str
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    # The context the gateway enforces (as /v1/models' max_model_len), not tokenizer_config.json's own value.
    model_max_length: int | None
