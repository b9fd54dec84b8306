"""A reasoning model's <think>...</think> split off its answer (hpcllm.gateway.chat.reasoning): which templates get a
parser, where the output starts, whole and streamed answers agreeing for every way the text can come in pieces, tool
calls read after the thinking. Built from constructed answers, as test_tool_calls does; through a real gateway:
test_reasoning_api.py."""

from __future__ import annotations

import pytest

from hpcllm.devmodels.tokenizer import CHAT_TEMPLATE, HERMES_TOOLS_CHAT_TEMPLATE, QWEN3_THINK_CHAT_TEMPLATE
from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.chat.reasoning import ReasoningParser, template_thinks
from hpcllm.gateway.chat.serving import AnswerReader, ChatChoiceStream, chat_choice
from hpcllm.gateway.chat.tool_calls import PARSERS
from hpcllm.gateway.serving import ChoiceResult, Delta
from hpcllm.worker.protocol import Thinking, TokenLogprobs

from .test_tool_calls import QWEN_TWO_CALLS, TOOLS, _message_of, _token_deltas

QWEN3 = ReasoningParser(starts_inside=False)  # the model writes <think> itself
R1 = ReasoningParser(starts_inside=True)  # the prompt opened the block
THOUGHT = "<think>\nThe user greets me. I greet back.\n</think>\n\nHello!"
REASONING_TEXT = "\nThe user greets me. I greet back.\n"


def test_templates_that_write_think_blocks_get_a_parser():
    assert template_thinks(QWEN3_THINK_CHAT_TEMPLATE)
    # DeepSeek-R1 distills: the generation prompt opens the block; earlier answers' thinking is cut off
    assert template_thinks("{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
                           "{% endif %}{{'<｜Assistant｜><think>\\n'}}")
    assert not template_thinks(CHAT_TEMPLATE) and not template_thinks(HERMES_TOOLS_CHAT_TEMPLATE)
    assert not template_thinks(None)


def test_where_the_output_starts_is_read_from_the_prompts_end():
    assert ReasoningParser.for_prompt("<|User|>hi<|Assistant|><think>\n") == R1
    assert ReasoningParser.for_prompt("<|im_start|>assistant\n") == QWEN3
    # enable_thinking=false: an empty block closes the prompt (the answer is read as Qwen3's, no thinking awaited)
    closed = ReasoningParser.for_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n", (5, 6))
    assert closed == ReasoningParser(starts_inside=False, marker_ids=(5, 6), thought_in_prompt=True)
    assert closed.worker_thinking(budget=8) is None
    assert ReasoningParser.for_prompt("<|user|>\nwhat does <think> mean?</s>\n<|assistant|>\n") == QWEN3


@pytest.mark.parametrize("parser, text, reasoning, content", [
    (QWEN3, THOUGHT, "\nThe user greets me. I greet back.\n", "\n\nHello!"),
    (QWEN3, "  <think>short</think>answer", "short", "answer"),
    (QWEN3, "Hello! No <think> here", None, "Hello! No <think> here"),  # a model that did not think
    (QWEN3, "<think>\ncut off while thinking", "\ncut off while thinking", ""),  # max_tokens hit
    (QWEN3, "<think></think>", None, ""),
    (QWEN3, "<thi", None, "<thi"),  # the marker never completed: text
    (R1, "I greet back.\n</think>\n\nHello!", "I greet back.\n", "\n\nHello!"),
    (R1, "<think>\nagain</think>Hi", "\nagain", "Hi"),
    (R1, "still thinking </thi", "still thinking </thi", ""),
    (R1, "", None, ""),
])
def test_a_whole_answer_splits_into_reasoning_and_content(parser, text, reasoning, content):
    assert parser.split(text) == (reasoning, content)


@pytest.mark.parametrize("parser, text", [(QWEN3, THOUGHT), (R1, THOUGHT.removeprefix("<think>")),
                                          (QWEN3, "  <think>a</think>b"), (QWEN3, "plain answer"),
                                          (R1, "thinking, cut </thi")])
def test_streamed_pieces_split_as_the_whole_answer_for_every_cut(parser, text):
    """Every way of cutting the text in two (a marker split anywhere) and one character at a time: the pieces add
    up to the whole answer's split, and no piece of reasoning holds part of a marker."""
    whole_reasoning, whole_content = parser.split(text)
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in cuts:
        stream = parser.stream()
        sent = [stream.feed(piece) for piece in pieces] + [stream.finish()]
        reasoning, content = "".join(r for r, _ in sent), "".join(c for _, c in sent)
        assert (reasoning or None, content) == (whole_reasoning, whole_content), pieces
        for r, _ in sent[:-1]:
            assert "</" not in r and "<think" not in r, (pieces, r)


def test_reasoning_tokens_are_the_tokens_between_the_markers():
    start, end = 7, 8
    qwen3, r1 = (ReasoningParser(inside, (start, end)) for inside in (False, True))
    assert qwen3.reasoning_tokens([start, 1, 2, 3, end, 4]) == 3
    assert qwen3.reasoning_tokens([start, 1, 2]) == 2  # never closed
    assert qwen3.reasoning_tokens([1, 2, end, 3]) == 0  # no thinking opened: content
    assert r1.reasoning_tokens([1, 2, end, 3]) == 2 and r1.reasoning_tokens([start, 1, end]) == 1
    assert r1.reasoning_tokens([]) == 0
    assert ReasoningParser(True).reasoning_tokens([1, 2, 3]) == 0  # markers not single tokens: not counted


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def _character_deltas(text: str, finish_reason: str) -> list[Delta]:
    """The answer a character at a time: every marker split (the qwen3-think tokenizer has them as single tokens)."""
    return [Delta(0, character) for character in text] + [Delta(0, "", finish_reason)]


def _streamed(reader: AnswerReader, req: ChatCompletionRequest, deltas: list[Delta]) -> dict:
    stream = ChatChoiceStream(reader, req)
    chunks = [choice.model_dump(exclude_none=True) for delta in deltas for choice in stream.choices(delta)]
    deltas_sent = [c["delta"] for c in chunks]

    def joined(key: str) -> str | None:
        parts = [d[key] for d in deltas_sent if key in d]
        return "".join(parts) if parts else None

    first_content = next((i for i, d in enumerate(deltas_sent) if d.get("content")), len(deltas_sent))
    assert all("reasoning" not in d for d in deltas_sent[first_content + 1:])  # thinking comes first
    return {"reasoning": joined("reasoning"), "content": joined("content"),
            "tool_calls": _message_of(chunks)["tool_calls"],  # the calls' pieces added up
            "finish_reason": chunks[-1]["finish_reason"]} | (
        {"logprobs": any("logprobs" in c for c in chunks)} if req.logprobs else {})


def test_chat_answers_carry_the_thinking_as_reasoning_whole_and_streamed():
    req = _request()
    reader = AnswerReader(reasoning=QWEN3)
    message = chat_choice(ChoiceResult(0, THOUGHT, "stop"), reader, req).message
    assert (message.reasoning, message.content) == ("\nThe user greets me. I greet back.\n", "\n\nHello!")
    for deltas in _token_deltas(THOUGHT, "stop", "qwen3-think"), _character_deltas(THOUGHT, "stop"):
        streamed = _streamed(reader, req, deltas)
        assert streamed == {"reasoning": message.reasoning, "content": message.content, "tool_calls": [],
                            "finish_reason": "stop"}


def test_an_answer_cut_off_while_thinking_has_no_content():
    req = _request()
    text = "<think>\nLet me think about this for a long"
    message = chat_choice(ChoiceResult(0, text, "length"), AnswerReader(reasoning=QWEN3), req).message
    assert (message.reasoning, message.content) == ("\nLet me think about this for a long", None)
    streamed = _streamed(AnswerReader(reasoning=QWEN3), req, _token_deltas(text, "length", "qwen3-think"))
    assert (streamed["reasoning"], streamed["content"], streamed["finish_reason"]) == (message.reasoning, None,
                                                                                       "length")


def test_tool_calls_are_read_after_the_thinking_only():
    """A call written while thinking is no call (the model only considered it); the ones after </think> are."""
    req = _request(tools=TOOLS)
    text = ('<think>\nMaybe <tool_call>{"name": "get_time", "arguments": {}}</tool_call>? No: both.\n</think>\n\n'
            + QWEN_TWO_CALLS)
    reader = AnswerReader(PARSERS["hermes"], QWEN3)
    choice = chat_choice(ChoiceResult(0, text, "stop"), reader, req)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning.startswith("\nMaybe <tool_call>")
    calls = [(call.function.name, call.function.arguments) for call in choice.message.tool_calls]
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    for deltas in _token_deltas(text, "stop", "qwen3-think"), _character_deltas(text, "stop"):
        streamed = _streamed(reader, req, deltas)
        assert streamed["reasoning"] == choice.message.reasoning and streamed["content"] is None
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed["tool_calls"]] == calls
        assert streamed["finish_reason"] == "tool_calls"


def test_include_reasoning_false_leaves_the_thinking_and_its_logprobs_out():
    """vLLM's include_reasoning: the thinking is not sent, nor the logprobs (their tokens would show it)."""
    req = _request(include_reasoning=False, logprobs=True)
    reader = AnswerReader(reasoning=QWEN3)
    pieces = _character_deltas(THOUGHT, "stop")
    result = ChoiceResult(0, THOUGHT, "stop", logprobs=[(TokenLogprobs(token=d.text, logprob=-1.0), i)
                                                        for i, d in enumerate(pieces[:-1])])
    choice = chat_choice(result, reader, req)
    assert (choice.message.reasoning, choice.message.content, choice.logprobs) == (None, "\n\nHello!", None)
    with_logprobs = [Delta(0, d.text, d.finish_reason, lp) for d, (lp, _) in zip(pieces, result.logprobs)]
    streamed = _streamed(reader, req, with_logprobs + pieces[-1:])
    assert (streamed["reasoning"], streamed["content"], streamed["logprobs"]) == (None, "\n\nHello!", False)
    shown = chat_choice(result, reader, _request(logprobs=True))  # the default: both sent
    assert shown.message.reasoning == REASONING_TEXT and len(shown.logprobs.content) == len(THOUGHT)


def test_without_a_reasoning_parser_think_tags_stay_in_the_content():
    message = chat_choice(ChoiceResult(0, THOUGHT, "stop"), AnswerReader(), _request()).message
    assert (message.reasoning, message.content) == (None, THOUGHT)
    assert message.model_dump()["reasoning"] is None  # vLLM's null
    streamed = _streamed(AnswerReader(), _request(), _token_deltas(THOUGHT, "stop", "qwen3-think"))
    assert (streamed["reasoning"], streamed["content"]) == (None, THOUGHT)


def test_a_constrained_answer_is_read_without_thinking():
    """The worker constrains from the first token: a JSON answer is all content (its reader has no reasoning)."""
    assert _request(response_format={"type": "json_object"}).constrained
    assert _request(tools=TOOLS, tool_choice="required").constrained
    assert not _request(tools=TOOLS).constrained and not _request().constrained


def test_the_worker_is_told_the_markers_where_the_output_may_think():
    """Inside thinking from the start: only the end marker; where the model opens the block: the start one too;
    markers that are not tokens: nothing to tell."""
    assert ReasoningParser.for_prompt("<|Assistant|><think>\n", (5, 6)).worker_thinking(None) == Thinking(
        end_token_id=6)
    assert ReasoningParser.for_prompt("<|im_start|>assistant\n", (5, 6)).worker_thinking(3) == Thinking(
        end_token_id=6, start_token_id=5, budget=3)
    assert ReasoningParser.for_prompt("<|im_start|>assistant\n").worker_thinking(3) is None
