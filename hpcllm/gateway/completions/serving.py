"""POST /v1/completions: tokenize the prompt(s), generate, answer in OpenAI's text_completion shape."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from flask import Response
from pydantic_core import to_json

from hpcllm.gateway.completions.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                                 CompletionResponse, CompletionResponseChoice,
                                                 CompletionStreamResponse)
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import UsageInfo
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import (SSE_DONE, SSE_HEADERS, ChoiceResult, Generation, RequestContext,
                                    check_prompt_logprobs, collect, context_length_error, new_response_id, sse,
                                    stream_error_event, vllm_prompt_logprobs)
from hpcllm.gateway.tokenization import PromptEncoder, Truncated
from hpcllm.worker.protocol import TokenLogprobs


def tokenize_prompts(gw: Gateway, req: CompletionRequest, card) -> list[Truncated]:
    """The prompts' token ids, truncated as the request asks (truncate_prompt_tokens), each with whether it was
    cut."""
    encoder = gw.tokenizers.get(card)
    truncation = encoder.truncation(req, card.max_model_len, generating=True)
    prompts = []
    for i, prompt in enumerate(req.prompt):
        param = "prompt" if len(req.prompt) == 1 else f"prompt[{i}]"
        tokens = encoder.prompt_ids(prompt, param, card.max_model_len, truncation,
                                    add_special_tokens=req.add_special_tokens)
        if not tokens.ids:
            raise InvalidRequest("the prompt is empty (no tokens after tokenization)", param=param,
                                 code="empty_prompt")
        prompts.append(tokens)
    return prompts


def completion_max_tokens(gw: Gateway, req: CompletionRequest, card, prompts: list[list[int]]) -> int:
    for prompt in prompts:
        context_length_error(card, len(prompt), req.max_tokens, "prompt")
    if req.max_tokens is not None:
        return req.max_tokens or 1  # echo's max_tokens 0: one token generated and dropped (vLLM)
    default = gw.config.gateway.default_completion_max_tokens
    if card.max_model_len is None:
        return default
    # Without an explicit max_tokens, shorten the default to what the context still holds (as vLLM does).
    return max(1, min(default, card.max_model_len - max(len(p) for p in prompts)))


def create_completion(gw: Gateway, ctx: RequestContext, req: CompletionRequest) -> Response | dict:
    req.check_supported()
    card = gw.router.get_model(req.model)
    tokenized = tokenize_prompts(gw, req, card)
    prompts = [tokens.ids for tokens in tokenized]
    max_tokens = completion_max_tokens(gw, req, card, prompts)
    response_id = new_response_id("cmpl")
    echo = Echo(gw.tokenizers.get(card), req, tokenized) if req.echo else None
    generation = Generation(gw, ctx, card, prompts,
                            req.sampling(max_tokens, req.worker_logprobs, req.worker_prompt_logprobs), response_id,
                            n=req.generated_per_prompt)
    generation.start(stream=bool(req.stream))
    if req.stream:
        response = Response(_stream(generation, req, ctx, echo), mimetype="text/event-stream",
                            headers=SSE_HEADERS)
        # Runs even when the client leaves before the first chunk (a never-started generator runs no finally).
        response.call_on_close(generation.close)
        return response
    results = best_choices(collect(generation), req.generated_per_prompt, req.choices_per_prompt)
    return CompletionResponse(
        id=response_id, created=ctx.created, model=req.model,
        choices=[_choice(i, r, req, echo, prompts) for i, r in enumerate(results)],
        usage=generation.usage,  # every generated choice counts, the best_of ones not returned too (as OpenAI)
    ).model_dump()


def _choice(index: int, result: ChoiceResult, req: CompletionRequest, echo: Echo | None,
            prompts: list[list[int]]) -> CompletionResponseChoice:
    text, logprobs, prompt_logprobs = result.text, None, None
    if req.logprobs is not None:
        logprobs = _logprobs(result.logprobs, len(echo.text(result.index)) if echo is not None else 0)
    if echo is not None:
        text = echo.text(result.index) + ("" if echo.only else text)
        if logprobs is not None:
            prompt = echo.logprobs(result.index, result.prompt_logprobs)
            logprobs = prompt if echo.only else _joined(prompt, logprobs)
    if req.prompt_logprobs is not None:
        prompt_logprobs = vllm_prompt_logprobs(prompts[result.index // req.generated_per_prompt],
                                                result.prompt_logprobs, req.prompt_logprobs)
    return CompletionResponseChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs,
                                    stop_reason=result.stop_reason, prompt_logprobs=prompt_logprobs)


class Echo:
    """What `echo` puts before each choice: its prompt's text (a token-id prompt decoded) and, with logprobs, the
    prompt tokens' log probabilities (vLLM's shape: the first token's logprob and alternatives are None)."""

    def __init__(self, encoder: PromptEncoder, req: CompletionRequest, prompts: list[Truncated]):
        self._encoder = encoder
        self._prompts = [tokens.ids for tokens in prompts]
        # A token-id prompt decoded, and a truncated one: the tokens the model was given.
        self._texts = [p if isinstance(p, str) and not tokens.cut else encoder.decode(tokens.ids)
                       for p, tokens in zip(req.prompt, prompts)]
        self._choices_per_prompt = req.generated_per_prompt
        self.only = req.echo_only  # max_tokens 0: the prompt alone, the generated token dropped
        self._top = req.logprobs or 0  # the worker may report more alternatives, for prompt_logprobs

    def text(self, choice: int) -> str:
        return self._texts[choice // self._choices_per_prompt]

    def logprobs(self, choice: int, entries: list[TokenLogprobs | None] | None) -> CompletionLogprobs:
        ids = self._prompts[choice // self._choices_per_prompt]
        check_prompt_logprobs(ids, entries)
        tokens = [self._encoder.decode(ids[:1])] + [entry.token for entry in entries[1:]]
        return CompletionLogprobs(
            text_offset=list(itertools.accumulate([len(token) for token in tokens[:-1]], initial=0)),
            token_logprobs=[None] + [entry.logprob for entry in entries[1:]],
            tokens=tokens,
            top_logprobs=[None] + [_top_logprobs(entry, self._top) for entry in entries[1:]],
        )


def _joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=first.text_offset + then.text_offset,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              tokens=first.tokens + then.tokens, top_logprobs=first.top_logprobs + then.top_logprobs)


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
        top_logprobs=[_top_logprobs(lp) for lp, _ in tokens],
    )


def _top_logprobs(entry: TokenLogprobs, alternatives: int | None = None) -> dict[str, float]:
    """A token's top_logprobs entry: the token itself first, then its most likely alternatives (the first
    `alternatives` of them; None: all the worker reported). OpenAI always returns the sampled token's log probability
    there, hence up to logprobs + 1 entries (vLLM's order); where two tokens decode alike the token's own value
    stays."""
    top = {entry.token: entry.logprob}
    for alternative in entry.top[:alternatives]:
        top.setdefault(alternative.token, alternative.logprob)
    return top


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
        """A chunk with one choice carrying text (no logprobs, no usage, no stop_reason)."""
        shape = self._choice_shapes.get((index, finish_reason))
        if shape is None:
            empty = CompletionChoice(index=index, text="", finish_reason=finish_reason).model_dump_json().encode()
            shape = self._choice_shapes[(index, finish_reason)] = tuple(empty.split(b'"text":""'))
        return b"".join((self._head, b'"choices":[', shape[0], b'"text":', to_json(text), shape[1], b"]",
                         self._tail))


def _stream(generation: Generation, req: CompletionRequest, ctx: RequestContext,
            echo: Echo | None = None) -> Iterator[bytes]:
    chunks = StreamChunks(generation.response_id, ctx.created, req.model, req.include_usage)
    offsets = [0] * generation.num_choices  # text streamed so far per choice (logprobs' text_offset)
    echoed = [False] * generation.num_choices
    try:
        for delta in generation.deltas():
            index = delta.index
            text, generated = ("", None) if echo is not None and echo.only else (delta.text, delta.logprobs)
            prefix, prompt_logprobs = "", None
            if echo is not None and not echoed[index]:  # the prompt goes out with the choice's first chunk
                echoed[index] = True
                prefix = echo.text(index)
                if req.logprobs is not None:
                    prompt_logprobs = echo.logprobs(index, delta.prompt_logprobs)
            offsets[index] += len(prefix)
            logprobs = None
            if req.logprobs is not None and generated is not None:
                logprobs = _logprobs([(generated, 0)], offsets[index])
            if prompt_logprobs is not None:
                logprobs = prompt_logprobs if logprobs is None else _joined(prompt_logprobs, logprobs)
            offsets[index] += len(text)
            text = prefix + text
            if not text and logprobs is None and delta.finish_reason is None:
                continue  # echo only: the dropped token's delta
            if logprobs is None and not req.continuous_usage and delta.stop_reason is None:
                yield chunks.text(delta.index, text, delta.finish_reason)
                continue
            choice = CompletionChoice(index=delta.index, text=text, finish_reason=delta.finish_reason,
                                      logprobs=logprobs, stop_reason=delta.stop_reason)
            yield chunks.render([choice], generation.choice_usage(index) if req.continuous_usage else None)
        if req.include_usage:
            yield chunks.render([], generation.usage)
    except Exception as exc:
        yield stream_error_event(exc, ctx.request_id)
    yield SSE_DONE
