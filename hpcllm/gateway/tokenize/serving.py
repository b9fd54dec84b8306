"""POST /tokenize and /detokenize: the model's own tokenizer and chat template, as the gateway uses them for a
generation - how long a prompt is against the model's context, before sending it. Nothing is routed to a worker."""

from __future__ import annotations

from pydantic import ValidationError

from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.protocol import validation_error
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.tokenize.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


def tokenize(gw: Gateway, req: TokenizeRequest) -> dict:
    card = gw.router.get_model(req.model)
    encoder = gw.tokenizers.get(card)
    if req.prompt is not None:
        ids = encoder.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        chat = _chat(req)
        ids = encoder.render_chat(chat.template_messages(), chat.template_tools(),
                                  add_generation_prompt=req.add_generation_prompt,
                                  add_special_tokens=bool(req.add_special_tokens))
    strs = encoder.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=card.max_model_len, tokens=ids,
                            token_strs=strs).model_dump()


def detokenize(gw: Gateway, req: DetokenizeRequest) -> dict:
    encoder = gw.tokenizers.get(gw.router.get_model(req.model))
    ids = encoder.check_token_ids(req.tokens, "tokens")
    return DetokenizeResponse(prompt=encoder.tokenizer.decode(ids)).model_dump()


def _chat(req: TokenizeRequest) -> ChatCompletionRequest:
    """The messages and tools as /v1/chat/completions reads them (the same checks, the same 4xx)."""
    try:
        chat = ChatCompletionRequest.model_validate({"model": req.model, "messages": req.messages,
                                                     **({"tools": req.tools} if req.tools is not None else {})})
    except ValidationError as exc:
        raise validation_error(exc) from None
    chat.check_supported()
    return chat
