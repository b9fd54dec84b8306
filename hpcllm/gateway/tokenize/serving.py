"""POST /tokenize, /detokenize and GET /tokenizer_info: the model's own tokenizer and chat template, as the gateway
uses them for a generation - how long a prompt is against the model's context, before sending it; what a client
needs to tokenize as the server does (lm-eval's remote tokenizer). Nothing is routed to a worker."""

from __future__ import annotations

from pydantic import ValidationError

from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.protocol import validation_error
from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import the_one_model
from hpcllm.gateway.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)


def tokenize(gw: Gateway, req: TokenizeRequest) -> dict:
    card = _card(gw, req.model)
    encoder = gw.tokenizers.get(card)
    if req.prompt is not None:
        ids = encoder.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        chat = _chat(req, card.name)
        messages = chat.template_messages()
        encoder.template_call_ids(messages, card.tool_call_parser)  # as a generation's prompt has them
        ids = encoder.render_chat(messages, chat.template_tools(), **chat.template_arguments()).token_ids
    strs = encoder.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=card.max_model_len, tokens=ids,
                            token_strs=strs).model_dump()


def detokenize(gw: Gateway, req: DetokenizeRequest) -> dict:
    encoder = gw.tokenizers.get(_card(gw, req.model))
    ids = encoder.check_token_ids(req.tokens, "tokens")
    return DetokenizeResponse(prompt=encoder.tokenizer.decode(ids)).model_dump()


def tokenizer_info(gw: Gateway, model: str | None) -> dict:
    card = _card(gw, model)
    encoder = gw.tokenizers.get(card)
    special = encoder.tokenizer.special_tokens_map  # only the tokens the tokenizer has (no warning for a missing one)
    return TokenizerInfoResponse(
        model=card.name, tokenizer_class=type(encoder.tokenizer).__name__,
        bos_token=special.get("bos_token"), eos_token=special.get("eos_token"), pad_token=special.get("pad_token"),
        unk_token=special.get("unk_token"), chat_template=encoder.chat_template,
        model_max_length=card.max_model_len).model_dump()


def _card(gw: Gateway, model: str | None) -> ModelCard:
    """The named model; when none is named, the gateway's only model, as vLLM (serving one) answers: clients written
    for vLLM (lm-eval's remote tokenizer) name none. With several, the client must choose."""
    if model is not None:
        return gw.router.get_model(model)
    cards = gw.router.list_models()
    return the_one_model(cards, len(cards), "tokenization")


def _chat(req: TokenizeRequest, model: str) -> ChatCompletionRequest:
    """The messages, tools and chat template fields as /v1/chat/completions reads them (the same checks, the same
    4xx)."""
    try:
        chat = ChatCompletionRequest.model_validate({"model": model, "messages": req.messages,
                                                     "add_generation_prompt": req.add_generation_prompt,
                                                     "add_special_tokens": bool(req.add_special_tokens),
                                                     **({"tools": req.tools} if req.tools is not None else {}),
                                                     **req.chat_fields()})
    except ValidationError as exc:
        raise validation_error(exc) from None
    chat.check_supported()
    return chat
