"""POST /v1/completions: tokenize the prompt(s), generate, answer in OpenAI's text_completion shape."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response
from pydantic_core import to_json

from hpcllm.gateway.completions.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                                 CompletionResponse, CompletionStreamResponse)
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import UsageInfo
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import (SSE_DONE, SSE_HEADERS, ChoiceResult, Generation, RequestContext, collect,
                                    context_length_error, new_response_id, sse, stream_error_event)
from hpcllm.worker.protocol import TokenLogprobs


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
    generation = Generation(gw, ctx, card, prompts, req.sampling(max_tokens, req.worker_logprobs), response_id,
                            n=req.generated_per_prompt)
    generation.start(stream=bool(req.stream))
    if req.stream:
        response = Response(_stream(generation, req, ctx), mimetype="text/event-stream", headers=SSE_HEADERS)
        # Runs even when the client leaves before the first chunk (a never-started generator runs no finally).
        response.call_on_close(generation.close)
        return response
    results = best_choices(collect(generation), req.generated_per_prompt, req.choices_per_prompt)
    return CompletionResponse(
        id=response_id, created=ctx.created, model=req.model,
        choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,
                                  logprobs=_logprobs(r.logprobs) if req.logprobs is not None else None)
                 for i, r in enumerate(results)],
        usage=generation.usage,  # every generated choice counts, the best_of ones not returned too (as OpenAI)
    ).model_dump()


def best_choices(results: list[ChoiceResult], generated: int, wanted: int) -> list[ChoiceResult]:
    """Per prompt, the `wanted` of its `generated` choices with the highest cumulative log probability (best_of),
    in that order; all of them, in order, when none are dropped."""
    if generated == wanted:
        return results
    best = []
    for first in range(0, len(results), generated):
        group = results[first:first + generated]
        best.extend(sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[:wanted])
    return best


def _logprobs(tokens: list[tuple[TokenLogprobs, int]], offset: int = 0) -> CompletionLogprobs:
    return CompletionLogprobs(
        text_offset=[offset + at for _, at in tokens],
        token_logprobs=[lp.logprob for lp, _ in tokens],
        tokens=[lp.token for lp, _ in tokens],
        top_logprobs=[{top.token: top.logprob for top in lp.top} for lp, _ in tokens],
    )


class StreamChunks:
    """The SSE events of one streamed completion. Every chunk has the same envelope (id, object, created, model,
    ...) and, per token, one choice with new text: the wire models render the envelope and each choice's shape
    once, and a token's chunk is the text's JSON filled in (pydantic's own serializer), byte for byte what
    rendering both models per token gives, at a fraction of the cost on the gateway's per-token path."""

    def __init__(self, response_id: str, created: int, model: str, include_usage: bool):
        self._envelope = {"id": response_id, "created": created, "model": model}
        # OpenAI puts "usage": null on every chunk when include_usage is on, and leaves the key out otherwise.
        self._exclude = None if include_usage else {"usage"}
        self._head, self._tail = self.render([]).split(b'"choices":[]')
        self._choice_shapes: dict[tuple[int, str | None], tuple[bytes, bytes]] = {}

    def render(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        """Any chunk, through the wire models."""
        body = CompletionStreamResponse(**self._envelope, choices=choices, usage=usage)
        return sse(body.model_dump_json(exclude=self._exclude))

    def text(self, index: int, text: str, finish_reason: str | None = None) -> bytes:
        """A chunk with one choice carrying text (no logprobs, no usage)."""
        shape = self._choice_shapes.get((index, finish_reason))
        if shape is None:
            empty = CompletionChoice(index=index, text="", finish_reason=finish_reason).model_dump_json().encode()
            shape = self._choice_shapes[(index, finish_reason)] = tuple(empty.split(b'"text":""'))
        return b"".join((self._head, b'"choices":[', shape[0], b'"text":', to_json(text), shape[1], b"]",
                         self._tail))


def _stream(generation: Generation, req: CompletionRequest, ctx: RequestContext) -> Iterator[bytes]:
    chunks = StreamChunks(generation.response_id, ctx.created, req.model, req.include_usage)
    offsets = [0] * generation.num_choices  # text streamed so far per choice (logprobs' text_offset)
    try:
        for delta in generation.deltas():
            logprobs = None
            if req.logprobs is not None and delta.logprobs is not None:
                logprobs = _logprobs([(delta.logprobs, 0)], offsets[delta.index])
            offsets[delta.index] += len(delta.text)
            if logprobs is None and not req.continuous_usage:
                yield chunks.text(delta.index, delta.text, delta.finish_reason)
                continue
            choice = CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason,
                                      logprobs=logprobs)
            yield chunks.render([choice], generation.usage if req.continuous_usage else None)
        if req.include_usage:
            yield chunks.render([], generation.usage)
    except Exception as exc:
        yield stream_error_event(exc, ctx.request_id)
    yield SSE_DONE
