"""A reasoning model's thinking in its answer: `<think>...</think>` separated from the content, as vLLM's
`--reasoning-parser deepseek_r1` / `qwen3` separate it (returned as `reasoning`, vLLM's field).

A model gets a reasoning parser when its chat template writes `<think>` or `</think>` (Qwen3, QwQ, the DeepSeek-R1
distills), as hpcllm.gateway.chat.tool_calls chooses the tool-call format. Per request, where its output starts:
  inside thinking   the rendered prompt ends with `<think>` (R1 distills, QwQ and Qwen3-Thinking-2507 open the
                    block in the generation prompt): everything up to the first `</think>` is reasoning.
  outside           otherwise (Qwen3: the model writes `<think>` itself; with enable_thinking=false its template
                    writes an empty block into the prompt and the model answers at once): an answer whose first text
                    (after whitespace) is `<think>` is reasoning up to `</think>`; any other answer is all content.
A constrained answer (a JSON schema, regex, choice, grammar, forced tool call) thinks first too, as vLLM's with a
reasoning parser: the worker is sent the markers' token ids (GenerateRequest.thinking) and constrains only what follows
</think> (where the output may open the block itself, a first token other than <think> begins the answer, constrained
at once); thinking_token_budget (vLLM's) bounds the thinking, the worker forcing </think> after that many tokens.
Where the markers are not single tokens a constrained answer is constrained from its first token and is all content.
Reasoning never closed (the answer hit max_tokens while thinking) is all reasoning, with no content, as vLLM returns
it. The text after `</think>` is the content as the model wrote it (vLLM strips nothing either); tool calls are read
from it alone.
Unlike vLLM's qwen3 parser, an answer that does not start with `<think>` is content, not reasoning: the parser is
chosen here from the template, not by the operator per model, and a model that does not think but shares a
thinking model's template (Qwen3-Instruct-2507) must not have its answers taken for reasoning.

Reasoning tokens (usage's completion_tokens_details.reasoning_tokens, the Responses API's reasoning_tokens) are counted
as vLLM counts them, on the output's token ids: those between <think> and </think>, the markers not counted; where
the model's vocabulary does not hold both markers as single tokens (every reasoning model's does) they are not
counted (0).

Streaming (ReasoningStream): the text is sent as it comes, only a tail that may still become `<think>` (at the start)
or `</think>` (while thinking) held back, so a marker split across tokens never reaches the client in pieces; the
whole answer is split by the same code, so streamed and whole answers agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hpcllm.gateway.chat.tool_calls import partial_suffix
from hpcllm.worker.protocol import Thinking

THINK_START = "<think>"
THINK_END = "</think>"


def template_thinks(template: str | None) -> bool:
    """A chat template of a reasoning model: it writes (or strips from earlier turns) a think block."""
    return template is not None and (THINK_START in template or THINK_END in template)


@dataclass(frozen=True)
class ReasoningParser:
    """One request's: whether its output starts inside thinking (the prompt opened the block); the marker tokens'
    ids (None: the vocabulary does not hold both as single tokens); whether the prompt ends with a closed think block
    (Qwen3's enable_thinking=false: the model answers without thinking)."""

    starts_inside: bool
    marker_ids: tuple[int, int] | None = None
    thought_in_prompt: bool = False

    @classmethod
    def for_prompt(cls, prompt: str, marker_ids: tuple[int, int] | None = None) -> ReasoningParser:
        end = prompt.rstrip()
        return cls(starts_inside=end.endswith(THINK_START), marker_ids=marker_ids,
                   thought_in_prompt=end.endswith(THINK_END))

    def worker_thinking(self, budget: int | None) -> Thinking | None:
        """What the worker needs to hold a grammar back until the thinking ends, and to bound the thinking to budget
        tokens (GenerateRequest.thinking); None where the output does not think (the prompt closed the block) or the
        markers are not tokens."""
        if self.marker_ids is None or self.thought_in_prompt:
            return None
        start_id, end_id = self.marker_ids
        return Thinking(end_token_id=end_id, start_token_id=None if self.starts_inside else start_id, budget=budget)

    def reasoning_tokens(self, output_ids: list[int]) -> int:
        """The output tokens inside the think block: after an opening <think> (or from the start, the prompt having
        opened it) up to the first </think> (or the end: thinking cut off)."""
        if self.marker_ids is None or not output_ids:
            return 0
        start_id, end_id = self.marker_ids
        begin = 1 if output_ids[0] == start_id else 0
        if not (begin or self.starts_inside):
            return 0
        try:
            return output_ids.index(end_id, begin) - begin
        except ValueError:  # never closed
            return len(output_ids) - begin

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.starts_inside)

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole answer's reasoning (None: it has none) and content."""
        stream = self.stream()
        reasoning, content = stream.feed(text)
        rest_reasoning, rest_content = stream.finish()
        return (reasoning + rest_reasoning) or None, content + rest_content


class _State(Enum):
    START = "start"  # nothing but whitespace yet: the answer may still open a think block
    THINKING = "thinking"
    CONTENT = "content"


class ReasoningStream:
    """One answer's text through the parser: feed() gives the (reasoning, content) that can be sent now, finish()
    what was held back once the answer ended."""

    def __init__(self, starts_inside: bool):
        self.starts_inside = starts_inside
        self.state = _State.START
        self.held = ""  # text not sent yet: it may still be (part of) a marker

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        if self.state is _State.START:
            begun = self.held.lstrip()
            if len(begun) < len(THINK_START) and THINK_START.startswith(begun):  # nothing yet, or <think> in pieces
                return "", ""
            if begun.startswith(THINK_START):
                self.held = begun[len(THINK_START):]
                self.state = _State.THINKING
            else:
                self.state = _State.THINKING if self.starts_inside else _State.CONTENT
        if self.state is _State.CONTENT:
            out, self.held = self.held, ""
            return "", out
        end = self.held.find(THINK_END)
        if end >= 0:
            reasoning, content = self.held[:end], self.held[end + len(THINK_END):]
            self.held, self.state = "", _State.CONTENT
            return reasoning, content
        keep = len(self.held) - partial_suffix(self.held, THINK_END)
        out, self.held = self.held[:keep], self.held[keep:]
        return out, ""

    def finish(self) -> tuple[str, str]:
        """What was held back: reasoning while thinking (or starting inside it), else content."""
        rest, self.held = self.held, ""
        thinking = self.state is _State.THINKING or (self.state is _State.START and self.starts_inside)
        return (rest, "") if thinking else ("", rest)
