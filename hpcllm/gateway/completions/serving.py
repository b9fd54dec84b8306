"""POST /v1/completions: tokenize the prompt(s), generate, answer in OpenAI's text_completion shape."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response

from hpcllm.gateway.completions.protocol import (CompletionChoice, CompletionRequest, CompletionResponse,
                                                 CompletionStreamResponse)
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import (SSE_DONE, SSE_HEADERS, Generation, RequestContext, collect,
                                    context_length_error, new_response_id, sse, stream_error_event)


def tokenize_prompts(gw: Gateway, req: CompletionRequest, card) -> list[list[int]]:
    encoder = gw.tokenizers.get(card)
    prompts = []
    for i, prompt in enumerate(req.prompt):
        param = "prompt" if len(req.prompt) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            encoder.check_fits(len(prompt), card.max_model_len, param)
        ids = encoder.encode(prompt) if isinstance(prompt, str) else encoder.check_token_ids(prompt, param)
        if not ids:
            raise InvalidRequest("the prompt is empty (no tokens after tokenization)", param=param,
                                 code="empty_prompt")
        prompts.append(ids)
    return prompts


def completion_max_tokens(gw: Gateway, req: CompletionRequest, card, prompts: list[list[int]]) -> int:
    for prompt in prompts:
        context_length_error(card, len(prompt), req.max_tokens, "prompt")
    if req.max_tokens is not None:
        return req.max_tokens
    default = gw.config.gateway.default_completion_max_tokens
    if card.max_model_len is None:
        return default
    # Without an explicit max_tokens, shorten the default to what the context still holds (as vLLM does).
    return max(1, min(default, card.max_model_len - max(len(p) for p in prompts)))


def create_completion(gw: Gateway, ctx: RequestContext, req: CompletionRequest) -> Response | dict:
    req.check_supported()
    card = gw.router.get_model(req.model)
    prompts = tokenize_prompts(gw, req, card)
    max_tokens = completion_max_tokens(gw, req, card, prompts)
    response_id = new_response_id("cmpl")
    generation = Generation(gw, ctx, card, prompts, req.sampling(max_tokens), response_id)
    generation.start(stream=bool(req.stream))
    if req.stream:
        response = Response(_stream(generation, req, ctx), mimetype="text/event-stream", headers=SSE_HEADERS)
        # Runs even when the client leaves before the first chunk (a never-started generator runs no finally).
        response.call_on_close(generation.close)
        return response
    texts, reasons = collect(generation)
    return CompletionResponse(
        id=response_id, created=ctx.created, model=req.model,
        choices=[CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))],
        usage=generation.usage,
    ).model_dump()


def _stream(generation: Generation, req: CompletionRequest, ctx: RequestContext) -> Iterator[bytes]:
    # OpenAI puts "usage": null on every chunk when include_usage is on, and leaves the key out otherwise.
    exclude = None if req.include_usage else {"usage"}

    def chunk(choices, usage=None) -> bytes:
        body = CompletionStreamResponse(id=generation.response_id, created=ctx.created, model=req.model,
                                        choices=choices, usage=usage)
        return sse(body.model_dump_json(exclude=exclude))

    try:
        for delta in generation.deltas():
            choice = CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason)
            yield chunk([choice], generation.usage if req.continuous_usage else None)
        if req.include_usage:
            yield chunk([], generation.usage)
    except Exception as exc:
        yield stream_error_event(exc, ctx.request_id)
    yield SSE_DONE
