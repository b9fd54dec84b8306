"""POST /v1/chat/completions: render the chat template (with the tools), generate, answer as chat.completion(.chunk)
(a reasoning model's thinking split off the answer: hpcllm.gateway.chat.reasoning; tool calls parsed out of the
rest: hpcllm.gateway.chat.tool_calls)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from flask import Response

from hpcllm.gateway.chat.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                          ChatCompletionResponse, ChatLogprobs, ChatStreamChoice, ChatTokenLogprob,
                                          ChatTopLogprob, ChatUsage, CompletionTokensDetails, DeltaFunctionCall,
                                          DeltaMessage, DeltaToolCall, FunctionCallOut, ToolCallOut)
from hpcllm.gateway.chat.reasoning import ReasoningParser
from hpcllm.gateway.chat.tool_calls import (CallPiece, NamedCall, ParsedCall, ParsedOutput, RequiredCalls,
                                            ToolCallParser, ToolCallStream)
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import UsageInfo
from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.tokenization import PromptEncoder
from hpcllm.gateway.serving import (SSE_DONE, SSE_HEADERS, ChoiceResult, Delta, Generation, RequestContext, collect,
                                    context_length_error, new_response_id, sse, stream_error_event,
                                    vllm_prompt_logprobs)
from hpcllm.worker.protocol import Thinking, TokenLogprobs


@dataclass(frozen=True)
class AnswerReader:
    """How one request's answers are read: the thinking split off (None: the model does not think, or the answer
    was constrained from its first token: its thinking markers are not tokens), then the tool calls parsed out of
    the rest (None: no tools, or tool_choice "none")."""

    tools: ToolCallParser | None = None
    reasoning: ReasoningParser | None = None

    def hides_thinking(self, req: ChatCompletionRequest) -> bool:
        """include_reasoning false for a model that thinks: no reasoning, and no logprobs (their tokens would show
        the thinking), as vLLM answers it."""
        return self.reasoning is not None and not req.include_reasoning


def create_chat_completion(gw: Gateway, ctx: RequestContext, req: ChatCompletionRequest) -> Response | dict:
    generation, reader = start_chat(gw, ctx, req, new_response_id("chatcmpl"))
    if req.stream:
        response = Response(_stream(generation, req, ctx, reader), mimetype="text/event-stream", headers=SSE_HEADERS)
        response.call_on_close(generation.close)
        return response
    results = collect(generation)
    prompt, = generation.prompts
    return ChatCompletionResponse(
        id=generation.response_id, created=ctx.created, model=req.model,
        choices=[chat_choice(result, reader, req) for result in results],
        usage=chat_usage(generation, reader),
        prompt_logprobs=None if req.prompt_logprobs is None else vllm_prompt_logprobs(
            prompt, results[0].prompt_logprobs, req.prompt_logprobs),  # one prompt: the worker scores it once
    ).model_dump()


def start_chat(gw: Gateway, ctx: RequestContext, req: ChatCompletionRequest,
               response_id: str) -> tuple[Generation, AnswerReader]:
    """Check the request, render its prompt and start generating: everything that can still be a 4xx/5xx (the
    Responses API, hpcllm.gateway.responses, starts its generations here too); and how to read the answer."""
    req.check_supported()
    messages = req.template_messages()
    card = gw.router.get_model(req.model)
    encoder = gw.tokenizers.get(card)
    encoder.template_call_ids(messages, card.tool_call_parser)
    truncation = encoder.truncation(req, card.max_model_len, generating=True)
    if truncation is None:
        encoder.check_fits(sum(len(m["content"]) for m in messages), card.max_model_len, "messages")
    rendered = encoder.render_chat(messages, req.template_tools(), **req.template_arguments(), truncation=truncation)
    prompt = rendered.token_ids
    reasoning = encoder.reasoning_parser(rendered)
    thinking = _worker_thinking(req, reasoning, card)
    # A constrained answer thinks first where the worker holds its grammar back until the thinking ends (the markers
    # are tokens); elsewhere it is what its constraint allows from the first token, all of it content.
    reader = AnswerReader(_parser(req, encoder, card) if req.tools else None,
                          None if req.constrained and thinking is None else reasoning)
    max_tokens = req.requested_max_tokens
    context_length_error(card, len(prompt), max_tokens, "messages", req.max_tokens_param)
    if max_tokens is None and card.max_model_len is not None:
        # OpenAI's chat default: as much as the context still holds.
        max_tokens = card.max_model_len - len(prompt)
    kept = encoder.special_token_ids(reader.tools.special_markers) if reader.tools is not None else None
    options = req.sampling(max_tokens, req.worker_logprobs, req.prompt_logprobs)
    if thinking is not None and (req.constrained or thinking.budget is not None):  # else the worker has no use for it
        options = replace(options, thinking=thinking)
    generation = Generation(gw, ctx, card, [prompt], options, response_id, n=req.choices_per_prompt, kept_tokens=kept)
    generation.start(stream=bool(req.stream))
    return generation, reader


def _worker_thinking(req: ChatCompletionRequest, reasoning: ReasoningParser | None, card: ModelCard) -> Thinking | None:
    """What the worker is told of the answer's thinking (None: it does not think); a 400 for a thinking budget the
    model cannot take (it does not think, or its markers are not tokens)."""
    budget = req.thinking_budget
    if budget is not None and (reasoning is None or reasoning.marker_ids is None):
        raise InvalidRequest(f"thinking_token_budget needs a reasoning model, whose chat template thinks in "
                             f"<think>...</think> with both markers as tokens; model {card.name!r} does not",
                             param="thinking_token_budget", code="invalid_value")
    return reasoning.worker_thinking(budget) if reasoning is not None else None


def chat_usage(generation: Generation, reader: AnswerReader) -> UsageInfo:
    """The generation's usage; a reasoning model's with the tokens its choices thought (vLLM's
    completion_tokens_details), counted once the generation ended (not in continuous usage: it would mean a pass
    over every choice's tokens at every chunk)."""
    usage = generation.usage
    if reader.reasoning is None:
        return usage
    thought = sum(reader.reasoning.reasoning_tokens(generation.output_ids(i)) for i in range(generation.num_choices))
    return ChatUsage(**usage.model_dump(), completion_tokens_details=CompletionTokensDetails(reasoning_tokens=thought))


def _parser(req: ChatCompletionRequest, encoder: PromptEncoder, card: ModelCard) -> ToolCallParser | None:
    """What reads the calls out of the answer: a forced call's own JSON (its ids in the model's format's shape), else
    the model's format (its config's, or its template's; None: "none")."""
    if req.forced_function is not None:
        return NamedCall(req.forced_function, encoder.tool_call_format(card.tool_call_parser))
    if req.tool_choice == "required":
        return RequiredCalls(encoder.tool_call_format(card.tool_call_parser))
    if not req.parses_tool_calls:
        return None
    return encoder.tool_call_parser(card.tool_call_parser).for_tools(req.parameters_by_name())


def chat_choice(result: ChoiceResult, reader: AnswerReader, req: ChatCompletionRequest) -> ChatChoice:
    """A whole choice's answer: its text, or (a reasoning model) its thinking and the rest, or (parsing tool calls)
    the text outside the calls and the calls."""
    hidden = reader.hides_thinking(req)
    logprobs = _logprobs([lp for lp, _ in result.logprobs]) if req.logprobs and not hidden else None
    reasoning, text = reader.reasoning.split(result.text) if reader.reasoning is not None else (None, result.text)
    parser = reader.tools
    parsed = parser.parse(text) if parser is not None else ParsedOutput(text)
    content = parsed.content
    if reader.reasoning is not None and not content:
        content = None  # all thinking (vLLM's null), or thinking and calls
    calls = parsed.calls[:_max_calls(req)]
    return ChatChoice(index=result.index, message=AssistantMessage(
        content=content, reasoning=None if hidden else reasoning,
        tool_calls=[ToolCallOut(id=parser.new_call_id(), function=FunctionCallOut(name=call.name,
                                                                                arguments=call.arguments))
                    for call in calls]),
        finish_reason=_finish_reason(calls, parser, result.finish_reason), logprobs=logprobs,
        stop_reason=result.stop_reason, last_call_cut=_last_call_cut(calls, parser, result.finish_reason))


def _max_calls(req: ChatCompletionRequest) -> int | None:
    return 1 if req.parallel_tool_calls is False else None


def _finish_reason(calls: tuple[ParsedCall, ...], parser: ToolCallParser | None, finish_reason: str) -> str:
    """The format's (tool_calls) for an answer with calls; the generation's own when the last call was cut short
    (its arguments not whole: "length" tells a client not to run it), a forced list of calls was (more may have
    followed), or there are none."""
    if not calls or not calls[-1].complete or (parser.cut_lists_end_with_length and finish_reason == "length"):
        return finish_reason
    return parser.finish_reason or finish_reason


def _last_call_cut(calls: tuple[ParsedCall, ...], parser: ToolCallParser | None, finish_reason: str) -> bool:
    """Whether the answer's last call stops before its end: its text does, or it is a named function's call, the
    whole answer, and max_tokens ended that."""
    return bool(calls) and (not calls[-1].complete or (isinstance(parser, NamedCall) and finish_reason == "length"))


class ChatChoiceStream:
    """One streamed choice's chunks: its text as it comes; a reasoning model's thinking as `reasoning` deltas, a
    marker that may be coming held back (ReasoningStream); parsing tool calls (in the text after the thinking), the
    text that may begin a call held back, and each call as it is written, its first chunk with its id, type and
    name, then its arguments in pieces, a forced call's too (ToolCallStream)."""

    def __init__(self, reader: AnswerReader, req: ChatCompletionRequest):
        self.req = req
        self.hidden = reader.hides_thinking(req)
        parser = reader.tools
        self.thinking = reader.reasoning.stream() if reader.reasoning is not None else None
        self.text = ToolCallStream(parser, _max_calls(req)) if parser is not None else None

    def choices(self, delta: Delta) -> Iterator[ChatStreamChoice]:
        index = delta.index
        logprobs = (_logprobs([delta.logprobs]) if self.req.logprobs and delta.logprobs is not None and not self.hidden
                    else None)
        reasoning, text = self.thinking.feed(delta.text) if self.thinking is not None else ("", delta.text)
        if delta.finish_reason and self.thinking is not None:
            rest_reasoning, rest_text = self.thinking.finish()
            reasoning, text = reasoning + rest_reasoning, text + rest_text
        if self.hidden:
            reasoning = ""
        content, pieces = self.text.feed(text) if self.text is not None else (text, [])
        if not delta.finish_reason:
            plain = self.text is None and self.thinking is None  # every token a chunk, as it always was
            if reasoning or content or (not pieces and (logprobs is not None or plain)):
                in_call = not (reasoning or content) and self.text is not None and self.text.in_call
                yield ChatStreamChoice(index=index, delta=DeltaMessage() if in_call else _delta(reasoning, content),
                                       logprobs=logprobs)  # a token's logprobs while a call is written: no content
                logprobs = None
            for piece in pieces:
                yield self._call_chunk(index, piece, logprobs)
                logprobs = None
            return
        calls: tuple[ParsedCall, ...] = ()
        if self.text is not None:
            rest, more, calls = self.text.finish()
            content += rest or ""
            pieces += more
        if reasoning or content:
            yield ChatStreamChoice(index=index, delta=_delta(reasoning, content))
        for piece in pieces:
            yield self._call_chunk(index, piece)
        parser = self.text.parser if self.text is not None else None
        yield ChatStreamChoice(index=index, delta=DeltaMessage(),
                               finish_reason=_finish_reason(calls, parser, delta.finish_reason),
                               stop_reason=delta.stop_reason,
                               last_call_cut=_last_call_cut(calls, parser, delta.finish_reason))

    def _call_chunk(self, index: int, piece: CallPiece, logprobs: ChatLogprobs | None = None) -> ChatStreamChoice:
        """A call's piece: its first with a new id, type and name."""
        if piece.name is None:
            call = DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))
        else:
            call = DeltaToolCall(index=piece.index, id=self.text.parser.new_call_id(), type="function",
                                 function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments))
        return ChatStreamChoice(index=index, delta=DeltaMessage(tool_calls=[call]), logprobs=logprobs)


def _delta(reasoning: str, content: str) -> DeltaMessage:
    """A chunk's text: its thinking and its content (an empty content only when there is no thinking either: a token
    chunk carrying logprobs)."""
    return DeltaMessage(reasoning=reasoning or None, content=content if content or not reasoning else None)


def _token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(tokens: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(**_token_logprob(lp.token, lp.logprob),
                         top_logprobs=[ChatTopLogprob(**_token_logprob(t.token, t.logprob)) for t in lp.top])
        for lp in tokens
    ])


def _stream(generation: Generation, req: ChatCompletionRequest, ctx: RequestContext,
            reader: AnswerReader) -> Iterator[bytes]:
    def chunk(choices, usage=None) -> bytes:
        body = ChatCompletionChunk(id=generation.response_id, created=ctx.created, model=req.model,
                                   choices=choices, usage=usage)
        return sse(body.to_sse_json(req.include_usage))

    def role(index: int) -> bytes:  # as OpenAI: a choice's first chunk announces the role, with empty content
        return chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))],
                     generation.choice_usage(index) if req.continuous_usage else None)

    announced = {0}
    streams = [ChatChoiceStream(reader, req) for _ in range(generation.num_choices)]
    try:
        yield role(0)
        for delta in generation.deltas():
            if delta.index not in announced:
                announced.add(delta.index)
                yield role(delta.index)
            for choice in streams[delta.index].choices(delta):
                yield chunk([choice], generation.choice_usage(delta.index) if req.continuous_usage else None)
        if req.include_usage:
            yield chunk([], chat_usage(generation, reader))
    except Exception as exc:
        yield stream_error_event(exc, ctx.request_id)
    yield SSE_DONE
