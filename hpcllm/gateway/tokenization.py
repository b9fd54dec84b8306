"""Prompt tokenization in the gateway.

The gateway turns prompts and chat messages into token ids itself (as vLLM's API server does) so it can count
prompt tokens exactly for the token limits and reject a prompt longer than the model's context with a 400
*before* routing - a bad request never triggers a cold start. Tokenizers are read from the model's checkpoint
directory on the shared filesystem (the converter copies the tokenizer files) and kept in a small LRU per process.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hpcllm.checkpoint.heads import SCORE_TEMPLATE_FILE, render_score_template
from hpcllm.checkpoint.promptbound import NORMALIZATION_SLACK, longest_token_chars, min_tokens
from hpcllm.gateway.chat.reasoning import THINK_END, THINK_START, ReasoningParser, template_thinks
from hpcllm.gateway.chat.tool_calls import PARSERS, ToolCallParser, known_format, template_format
from hpcllm.gateway.errors import InternalError, InvalidRequest, ServiceUnavailable
from hpcllm.gateway.routing import ModelCard
from hpcllm.worker.protocol import INVALID_MESSAGES, chat_template_refusal

if TYPE_CHECKING:
    from hpcllm.gateway.protocol import TruncatingRequest

log = logging.getLogger(__name__)
# apply_chat_template's parameters that are also request fields of /v1/chat/completions and /tokenize.
REQUEST_FIELDS = ("tools", "documents", "add_generation_prompt", "continue_final_message")


# Tokens kept past those a truncation keeps before a text is cut by characters (PromptEncoder.shortened): the cut
# changes the tokens near it only.
TRUNCATION_SLACK_TOKENS = 8


@dataclass(frozen=True)
class Truncation:
    """A request's truncate_prompt_tokens and truncation_side, resolved for its model (PromptEncoder.truncation):
    each prompt keeps `tokens` tokens, its first ones (side "right") or its last ones ("left")."""

    tokens: int
    side: Literal["left", "right"]
    by_tokenizer: bool  # no side asked: the tokenizer truncates a text itself, keeping its special tokens (vLLM's)
    # The tokenizer cuts a text pair's second text only (vLLM's, for a cross-encoder's pair where max_tokens_per_doc
    # is asked); what it cannot cut so is then cut by side.
    second_only: bool = False

    def keep(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.tokens:
            return ids
        return ids[-self.tokens:] if self.side == "left" else ids[:self.tokens]

    def cut(self, text: str, chars: int) -> str:
        """text's `chars` characters on the side kept."""
        return text[-chars:] if self.side == "left" else text[:chars]


@dataclass(frozen=True)
class Truncated:
    """A prompt's token ids after truncation, and whether anything was cut (an echo shows the text otherwise)."""

    ids: list[int]
    cut: bool


@dataclass
class PromptEncoder:
    tokenizer: object

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @cached_property
    def max_token_chars(self) -> int:
        return longest_token_chars(self.tokenizer)

    def min_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of any text of `chars` characters (hpcllm.checkpoint.promptbound)."""
        return min_tokens(chars, self.max_token_chars)

    def check_fits(self, chars: int, max_model_len: int | None, param: str) -> None:
        """400 before tokenizing a prompt too long for the context whatever its tokens: tokenizing a 4 MB prompt
        takes seconds of the gateway's CPU, checking its length nothing."""
        if max_model_len is None:
            return
        at_least = self.min_tokens(chars)
        if at_least >= max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has at least "
                f"{at_least} tokens ({chars} characters). Please reduce the length of the prompt.",
                param=param, code="context_length_exceeded")

    def encode(self, text: str, add_special_tokens: bool = True, *, pair: str | None = None) -> list[int]:
        """text's token ids (pair: a cross-encoder's second text, the tokenizer's text pair). Like vLLM and
        `tokenizer(prompt)` in transformers: the model's BOS (if any) is added."""
        return list(self.tokenizer(text, text_pair=pair, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_truncated(self, text: str, truncation: Truncation, *, pair: str | None = None,
                         add_special_tokens: bool = True) -> Truncated:
        """encode, truncated as asked: a long text is first shortened by characters, then tokenized; if it has more
        tokens than kept, the tokenizer truncates it (no side asked) or the side's tokens are kept."""
        short = self.shortened(text, truncation)
        short_pair = None if pair is None else self.shortened(pair, truncation)
        shortened = (short, short_pair) != (text, pair)  # then it has more tokens than kept
        if not (shortened and truncation.by_tokenizer):  # else the tokenizer's own truncation below is the one pass
            ids = self.encode(short, add_special_tokens, pair=short_pair)
            if len(ids) <= truncation.tokens:
                return Truncated(ids, shortened)
            if not truncation.by_tokenizer:
                return Truncated(truncation.keep(ids), True)
        if truncation.second_only and short_pair is not None:
            ids = self._cut_second(short, short_pair, truncation, add_special_tokens)
        else:
            ids = self._tokenizer_truncated(short, short_pair, True, truncation.tokens, add_special_tokens)
        return Truncated(truncation.keep(ids), True)

    def _cut_second(self, text: str, pair: str, truncation: Truncation, add_special_tokens: bool) -> list[int]:
        """The pair with its second text cut by the tokenizer (only_second); where the first text alone is over the
        bound the pair is tokenized whole, for keep to cut by side (a slow tokenizer returns it whole itself, a fast
        one raises a plain Exception: "Sequence to truncate too short to respect the provided max_length")."""
        try:
            return self._tokenizer_truncated(text, pair, "only_second", truncation.tokens, add_special_tokens)
        except InvalidRequest:
            raise
        except Exception:  # noqa: BLE001 - the tokenizers library's error has no narrower type
            return self.encode(text, add_special_tokens, pair=pair)

    def _tokenizer_truncated(self, text: str, pair: str | None, strategy: bool | str, tokens: int,
                             add_special_tokens: bool) -> list[int]:
        try:
            return list(self.tokenizer(text, text_pair=pair, add_special_tokens=add_special_tokens,
                                       truncation=strategy, max_length=tokens)["input_ids"])
        except ValueError as exc:  # transformers: a pair that cannot be cut that short around its special tokens
            raise InvalidRequest(f"truncate_prompt_tokens {tokens} is too few tokens for this input: {exc}",
                                 param="truncate_prompt_tokens", code="invalid_value") from None

    def prompt_ids(self, text_or_ids: str | list[int], param: str, max_model_len: int | None,
                   truncation: Truncation | None, pair: str | None = None, add_special_tokens: bool = True) -> Truncated:
        """A prompt's token ids (a text encoded, with the tokenizer's special tokens unless add_special_tokens is
        false; pair: a cross-encoder's second text; token ids checked against the vocabulary), truncated as asked; an untruncated text too long for the context whatever its tokens is a 400
        before it is tokenized (check_fits). A 400 naming param for what is wrong."""
        if isinstance(text_or_ids, str):
            if truncation is not None:
                return self.encode_truncated(text_or_ids, truncation, pair=pair, add_special_tokens=add_special_tokens)
            self.check_fits(len(text_or_ids) + len(pair or ""), max_model_len, param)
            return Truncated(self.encode(text_or_ids, add_special_tokens, pair=pair), cut=False)
        ids = self.check_token_ids(text_or_ids, param)
        kept = ids if truncation is None else truncation.keep(ids)
        return Truncated(kept, cut=len(kept) < len(ids))

    def shortened(self, text: str, truncation: Truncation) -> str:
        """text cut by characters on the side truncation drops, keeping TRUNCATION_SLACK_TOKENS tokens more than it
        keeps (tokenizing megabytes to keep a few tokens would take seconds of the gateway's CPU): first to what
        holds that many tokens by promptbound's rule, widened while a normalizer (BERT's collapsed whitespace) left
        fewer."""
        wanted = truncation.tokens + TRUNCATION_SLACK_TOKENS
        chars = wanted * self.max_token_chars * NORMALIZATION_SLACK
        while len(text) > chars:
            cut = truncation.cut(text, chars)
            if len(self.encode(cut, add_special_tokens=False)) >= wanted:
                return cut
            chars *= 4
        return text

    def cut_to_tokens(self, text: str, tokens: int) -> str:
        """text's start holding its first `tokens` tokens (special tokens not counted), cut where the tokenizer's
        offsets put a token's boundary: vLLM's truncate_text_to_tokens (max_tokens_per_query, max_tokens_per_doc),
        no decode round trip, re-tokenized until a merge across the cut no longer leaves too many. A long text is
        first shortened by characters (shortened)."""
        text = self.shortened(text, Truncation(tokens, "right", by_tokenizer=False))
        while text:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) <= tokens:
                break
            end = min(offsets[tokens - 1][1], offsets[tokens][0])
            text = text[:min(end, len(text) - 1)]
        return text

    def truncation(self, asked: TruncatingRequest, max_model_len: int | None, generating: bool) -> Truncation | None:
        """The request's truncate_prompt_tokens and truncation_side for this model (None: none asked). -1 is as
        many tokens as the context holds (less one for a generation's first token, as vLLM); 0, or more than the
        context holds, a 400."""
        tokens, side = asked.truncate_prompt_tokens, asked.truncation_side
        if tokens is None:
            return None
        limit = None if max_model_len is None else max_model_len - int(generating)
        if tokens == -1 and limit is None:
            raise InvalidRequest("truncate_prompt_tokens -1 means the model's context length, which this model does "
                                 "not declare: give a number of tokens", param="truncate_prompt_tokens",
                                 code="invalid_value")
        tokens = limit if tokens == -1 else tokens
        if tokens == 0:
            raise InvalidRequest("truncate_prompt_tokens 0 would keep no token: give at least 1, or -1 for as many as "
                                 "the model's context holds", param="truncate_prompt_tokens", code="invalid_value")
        if limit is not None and tokens > limit:
            raise InvalidRequest(f"truncate_prompt_tokens={tokens} cannot be greater than {limit}, the model's maximum "
                                 f"context length{' less the first generated token' if generating else ''}; give "
                                 "-1 for as many as it holds", param="truncate_prompt_tokens", code="invalid_value")
        tokenizer_side = getattr(self.tokenizer, "truncation_side", "right")
        return Truncation(tokens, "left" if (side or tokenizer_side) == "left" else "right", by_tokenizer=side is None)

    def decode(self, ids: list[int]) -> str:
        """Token ids' text, special tokens kept (an echoed token-id prompt, vLLM's prompt text)."""
        return self.tokenizer.decode(ids)

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})",
                                 param=param, code="invalid_token_id")
        return ids

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, documents: list[dict] | None = None,
                    template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False,
                    truncation: Truncation | None = None) -> RenderedChat:
        """The prompt: the messages (and the tools' definitions, if any) through the chat template, with the
        request's template_kwargs (chat_template_kwargs) as the template's variables. The template holds the special
        tokens (BOS, role markers): none are added unless asked (/tokenize may)."""
        if template_kwargs:
            check_template_kwargs(template_kwargs)
        arguments = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                     "documents": documents, **(template_kwargs or {})}
        text = self._render(messages, tools, arguments)
        if tools and text == self._render(messages, None, arguments):
            # transformers hands a template tools= whether it reads them or not: a model told of no tools would
            # answer as if there were none, and the client would never know why.
            raise InvalidRequest("this model's chat template does not support tools; send the request without "
                                 "'tools'", param="tools", code="unsupported_parameter")
        if truncation is not None:  # the rendered prompt truncated (truncate_prompt_tokens)
            kept = self.encode_truncated(text, truncation, add_special_tokens=add_special_tokens)
            # The text the model is given (its end, say whether thinking is open: reasoning_parser).
            return RenderedChat(self.decode(kept.ids) if kept.cut else text, kept.ids)
        return RenderedChat(text, self.encode(text, add_special_tokens))

    def render_scores(self, template: str, pairs: list[tuple[str, str]], template_kwargs: dict[str, Any] | None,
                      param_of: Callable[[int], str]) -> list[str]:
        """A cross-encoder's (query, document) pairs through its score template (vLLM's), with the request's
        chat_template_kwargs (checked once); a 400 naming param_of(i) when the template refuses the i-th pair, a 500
        when it does not parse (the checkpoint's fault: hpcllm convert checks a template, a folder served as it is
        may hold any)."""
        from jinja2 import TemplateSyntaxError

        if template_kwargs:
            check_template_kwargs(template_kwargs)
        texts = []
        for i, (query, document) in enumerate(pairs):
            try:
                texts.append(render_score_template(self.tokenizer, template, query, document, template_kwargs))
            except TemplateSyntaxError as exc:
                log.error("a score template does not parse: %s", exc)
                raise InternalError(f"the model's score template ({SCORE_TEMPLATE_FILE}) does not parse ({exc}); ask "
                                    "the operator to convert the model again with a working --score-template") from None
            except Exception as exc:  # jinja's render errors, the template's own raise_exception
                raise InvalidRequest(f"the model's score template rejected the pair: {exc}", param=param_of(i),
                                     code="invalid_value") from None
        return texts

    @property
    def chat_template(self) -> str | None:
        """The template a chat without tools renders with; None when the model has none (or only named ones)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        try:
            return self.tokenizer.get_chat_template()
        except ValueError:  # a dict of named templates without a default one
            return None

    def tool_call_parser(self, configured: str | None = None) -> ToolCallParser:
        """How this model writes tool calls: its config's tool_call_parser, else read from its chat template (a 400
        when that is not clear)."""
        return known_format(self.tool_call_format(configured))

    def tool_call_format(self, configured: str | None = None) -> ToolCallParser | None:
        """The format tool_call_parser says, or None where the template names none or several (no 400: a forced
        call's answer is read without it, only its ids take its shape)."""
        return PARSERS[configured] if configured is not None else self._template_format

    @cached_property
    def _template_format(self) -> ToolCallParser | None:
        """The format its tool-use chat template names (template_format), read once: the template never changes."""
        try:
            template = self.tokenizer.get_chat_template(tools=[{}])  # the tool-use one, of several
        except ValueError:  # no template, or named ones and neither for tools nor a default: rendering says so
            return None
        return template_format(template)

    def template_call_ids(self, messages: list[dict], configured: str | None = None) -> None:
        """The chat history's call ids (an assistant's calls, a tool's answer) made what the template of the model's
        tool-call format (its config's, or its template's) takes back: a mistral model's, 9 characters."""
        with_ids = [m for m in messages if m.get("tool_calls") or "tool_call_id" in m]
        if not with_ids:
            return
        parser = self.tool_call_format(configured)
        if parser is None:
            return
        ids = [call["id"] for message in with_ids for call in message.get("tool_calls", ())]
        ids += [message["tool_call_id"] for message in with_ids if "tool_call_id" in message]
        template_ids = parser.template_call_ids(ids)
        for message in with_ids:
            for call in message.get("tool_calls", ()):
                call["id"] = template_ids[call["id"]]
            if "tool_call_id" in message:
                message["tool_call_id"] = template_ids[message["tool_call_id"]]

    def special_token_ids(self, texts: tuple[str, ...]) -> dict[int, str]:
        """The ids of those of `texts` that are special tokens of this tokenizer (decoding skips them)."""
        return {self._special_tokens[text]: text for text in texts if text in self._special_tokens}

    @cached_property
    def _special_tokens(self) -> dict[str, int]:
        return {token.content: token_id for token_id, token in self.tokenizer.added_tokens_decoder.items()
                if token.special}

    def reasoning_parser(self, prompt: RenderedChat) -> ReasoningParser | None:
        """How this model's thinking is read out of its answer to `prompt` (None: its template writes none)."""
        return ReasoningParser.for_prompt(prompt.text, self._think_marker_ids) if self._thinks else None

    @cached_property
    def _thinks(self) -> bool:
        return template_thinks(self.chat_template)

    @cached_property
    def _think_marker_ids(self) -> tuple[int, int] | None:
        """<think>'s and </think>'s token ids, where the vocabulary holds them as tokens (reasoning tokens are
        counted by them)."""
        vocab = self.tokenizer.get_vocab()
        start, end = vocab.get(THINK_START), vocab.get(THINK_END)
        return (start, end) if start is not None and end is not None else None

    def _render(self, messages: list[dict], tools: list[dict] | None, arguments: dict[str, Any]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions with a plain prompt",
                                 param="messages", code="no_chat_template")
        from jinja2 import TemplateSyntaxError

        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **arguments)
        except TemplateSyntaxError as exc:  # the model's fault, not the request's
            log.error("a chat template does not parse: %s", exc)
            raise InternalError(f"the model's chat template does not parse ({exc})") from None
        except Exception as exc:  # templates raise their own errors (e.g. "roles must alternate")
            raise InvalidRequest(chat_template_refusal(exc), param="messages", code=INVALID_MESSAGES) from None


@dataclass(frozen=True)
class RenderedChat:
    text: str
    token_ids: list[int]


@cache
def renderer_arguments() -> frozenset[str]:
    """The names chat_template_kwargs must not take: apply_chat_template's own parameters (tokenize, tools,
    add_generation_prompt, ...: the request's own fields, or nothing a client may set) and the template's
    `messages`."""
    from transformers import PreTrainedTokenizerBase

    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)) - {"self"} | {
        "messages"}


def check_template_kwargs(template_kwargs: dict[str, Any]) -> None:
    clash = sorted(set(template_kwargs) & renderer_arguments())
    if clash:
        own = [name for name in clash if name in REQUEST_FIELDS]
        hint = f"send {', '.join(repr(n) for n in own)} as the request's own field" if own else "leave them out"
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(repr(n) for n in clash)}: the server "
                             f"passes it to the chat template itself; {hint}", param="chat_template_kwargs",
                             code="invalid_value")


class TokenizerCache:
    def __init__(self, max_loaded: int = 8):
        self._max_loaded = max_loaded
        self._loaded: OrderedDict[Path, PromptEncoder] = OrderedDict()
        self._lock = threading.Lock()
        # One load at a time: the first requests for a model arrive together, and each loading its own copy cost
        # CPU for nothing, while transformers' lazy imports, raced from two threads, failed one with an ImportError.
        self._load_lock = threading.Lock()

    def get(self, card: ModelCard) -> PromptEncoder:
        source = Path(card.source)
        encoder = self._cached(source)
        if encoder is not None:
            return encoder
        with self._load_lock:
            encoder = self._cached(source)  # loaded while this thread waited
            if encoder is None:
                encoder = PromptEncoder(self._load(card.name, source))
                with self._lock:
                    self._loaded[source] = encoder
                    while len(self._loaded) > self._max_loaded:
                        self._loaded.popitem(last=False)
        return encoder

    def _cached(self, source: Path) -> PromptEncoder | None:
        with self._lock:
            if source in self._loaded:
                self._loaded.move_to_end(source)
            return self._loaded.get(source)

    @staticmethod
    def _load(name: str, source: Path):
        from transformers import AutoTokenizer  # heavy import: only when a tokenizer is first needed

        try:
            return AutoTokenizer.from_pretrained(str(source))
        except Exception as exc:
            log.error("cannot load the tokenizer of model %s from %s: %s", name, source, exc)
            raise ServiceUnavailable(  # the path is the log's, not the client's (no filesystem paths in answers)
                f"the gateway cannot read the tokenizer of model {name!r}; ask the operator to check that the "
                f"checkpoint directory is visible from the gateway", code="tokenizer_unavailable",
                retry_after=30) from None
