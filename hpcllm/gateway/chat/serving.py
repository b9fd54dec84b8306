"""POST /v1/chat/completions: render the chat template, generate, answer as chat.completion(.chunk)."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response

from hpcllm.gateway.chat.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                          ChatCompletionResponse, ChatLogprobs, ChatStreamChoice, ChatTokenLogprob,
                                          ChatTopLogprob, DeltaMessage)
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import (SSE_DONE, SSE_HEADERS, Generation, RequestContext, collect,
                                    context_length_error, new_response_id, sse, stream_error_event)
from hpcllm.worker.protocol import TokenLogprobs


def create_chat_completion(gw: Gateway, ctx: RequestContext, req: ChatCompletionRequest) -> Response | dict:
    req.check_supported()
    messages = req.template_messages()
    card = gw.router.get_model(req.model)
    encoder = gw.tokenizers.get(card)
    encoder.check_fits(sum(len(m["content"]) for m in messages), card.max_model_len, "messages")
    prompt = encoder.render_chat(messages)
    max_tokens = req.requested_max_tokens
    context_length_error(card, len(prompt), max_tokens, "messages")
    if max_tokens is None and card.max_model_len is not None:
        # OpenAI's chat default: as much as the context still holds.
        max_tokens = card.max_model_len - len(prompt)
    response_id = new_response_id("chatcmpl")
    generation = Generation(gw, ctx, card, [prompt], req.sampling(max_tokens, req.worker_logprobs), response_id,
                            n=req.choices_per_prompt)
    generation.start(stream=bool(req.stream))
    if req.stream:
        response = Response(_stream(generation, req, ctx), mimetype="text/event-stream", headers=SSE_HEADERS)
        response.call_on_close(generation.close)
        return response
    return ChatCompletionResponse(
        id=response_id, created=ctx.created, model=req.model,
        choices=[ChatChoice(index=r.index, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                            logprobs=_logprobs([lp for lp, _ in r.logprobs]) if req.logprobs else None)
                 for r in collect(generation)],
        usage=generation.usage,
    ).model_dump()


def _token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(tokens: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(**_token_logprob(lp.token, lp.logprob),
                         top_logprobs=[ChatTopLogprob(**_token_logprob(t.token, t.logprob)) for t in lp.top])
        for lp in tokens
    ])


def _stream(generation: Generation, req: ChatCompletionRequest, ctx: RequestContext) -> Iterator[bytes]:
    def chunk(choices, usage=None) -> bytes:
        body = ChatCompletionChunk(id=generation.response_id, created=ctx.created, model=req.model,
                                   choices=choices, usage=usage)
        return sse(body.to_sse_json(req.include_usage))

    def role(index: int) -> bytes:  # as OpenAI: a choice's first chunk announces the role, with empty content
        return chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))],
                     generation.usage if req.continuous_usage else None)

    announced = {0}
    try:
        yield role(0)
        for delta in generation.deltas():
            if delta.index not in announced:
                announced.add(delta.index)
                yield role(delta.index)
            logprobs = _logprobs([delta.logprobs]) if req.logprobs and delta.logprobs is not None else None
            if delta.finish_reason:
                if delta.text:
                    yield chunk([ChatStreamChoice(index=delta.index, delta=DeltaMessage(content=delta.text))])
                choice = ChatStreamChoice(index=delta.index, delta=DeltaMessage(), finish_reason=delta.finish_reason)
            else:
                choice = ChatStreamChoice(index=delta.index, delta=DeltaMessage(content=delta.text),
                                          logprobs=logprobs)
            yield chunk([choice], generation.usage if req.continuous_usage else None)
        if req.include_usage:
            yield chunk([], generation.usage)
    except Exception as exc:
        yield stream_error_event(exc, ctx.request_id)
    yield SSE_DONE
