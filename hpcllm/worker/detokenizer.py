"""Incremental detokenization with stop strings, for streaming.

Text is produced by decoding a window of the output ids and emitting the new suffix (the prefix-offset scheme of
TGI and vLLM): decoding whole sequences rather than single tokens gets merged tokens and multi-byte characters
right, and a suffix ending in U+FFFD (an incomplete UTF-8 sequence split across tokens) is held back until the
next token completes it. The window keeps each step O(1) instead of re-decoding the whole output.

Stop strings follow OpenAI semantics: the output ends just before the first occurrence of any stop string, and
the stop string itself is never emitted. Text that could still turn out to be the start of a stop string is held
back until it cannot; `flush` releases what is held when the generation ends for another reason.

Where the tokenizer is a fast one decoding as transformers does, each token goes through a
`tokenizers.decoders.DecodeStream` instead (vLLM's detokenizer): the same prefix-offset scheme run inside the Rust
library, one Python call per token rather than two window slices and two decodes (a token through this class:
~1.7-2.0 us instead of ~2.5-3.0 us on the dev tokenizer, bench/worker_stream.py). Its output is the window scheme's, token for token: a stream
returns text only when its decode grew and starts with the previous one (then both schemes emit the same suffix and
move the same offsets), and where it returns nothing the window scheme checks that it would emit nothing either. A
decoder that rewrites earlier text (a Metaspace decoder dropping a leading space, say) makes the stream refuse a
step; this detokenizer then goes on with the window scheme from the same offsets, so the text never changes.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


def _fast_backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer whose decoding is transformers' own, else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the plain call
        return None
    if type(tokenizer)._decode is TokenizersBackend._decode:
        return tokenizer.backend_tokenizer
    return None


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text with special tokens skipped and no clean-up of spaces, as `tokenizer.decode` gives it.

    For a fast tokenizer whose decoding is transformers' own, that call is its Rust backend's decode wrapped in
    ~9 us of Python: the backend is called directly (the detokenizer's window scheme decodes twice per generated
    token, on the engine thread). Any other tokenizer goes through `decode`."""
    backend = _fast_backend(tokenizer)
    if backend is not None:
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def leading_space_marker(tokenizer) -> str | None:
    """The word marker ("▁") of a fast tokenizer that pre-tokenizes with Metaspace (SentencePiece's: Mistral, newer
    Llama conversions), whose decoder drops the leading space of a token decoded alone; None for any other (byte-level
    BPE keeps its spaces). vLLM's get_leading_space_marker."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    for step in [pre, *pre.get("pretokenizers", [])]:
        if step.get("type") == "Metaspace":
            return step.get("replacement", "▁")
    return None


def with_leading_spaces(piece: str, text: str, marker: str) -> str:
    """text, a token decoded alone, with the spaces its vocabulary piece's leading markers stand for that decoding
    dropped: the token's text in an answer (vLLM's _restore_leading_spaces)."""
    marked = len(piece) - len(piece.lstrip(marker))
    missing = marked - (len(text) - len(text.lstrip(" ")))
    return " " * missing + text if missing > 0 else text


StreamStep = Callable[[int], "str | None"]  # one token in, the text it made final (None: none yet)
# Prompt ids a request's detokenizer reads before its output, for context only (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET): the first token's text is what it adds to the prompt's.
CONTEXT_TOKENS = 5


def prompt_context(decode: Callable[[list[int]], str], prompt_ids: Sequence[int]) -> list[int]:
    """The context ids of an output that follows prompt_ids (IncrementalDetokenizer's): its last CONTEXT_TOKENS,
    none where they end inside a character (token ids sent as the prompt can): the output's first bytes would
    finish a character half the prompt's, which neither scheme can emit whole."""
    context = list(prompt_ids[-CONTEXT_TOKENS:])
    return [] if decode(context).endswith(REPLACEMENT_CHAR) else context


def decode_streams(tokenizer, lock: threading.Lock) -> Callable[..., StreamStep] | None:
    """A factory of incremental decoders (one per request) over the tokenizer's Rust backend, each step taken
    under `lock` (fast tokenizers are not safe to share across threads). None where text_decoder does not call the
    backend directly (a slow tokenizer, one whose decode is not transformers' own): the window scheme alone then."""
    from tokenizers.decoders import DecodeStream

    backend = _fast_backend(tokenizer)
    if backend is None:
        return None

    def new_stream(context: Sequence[int] = ()) -> StreamStep:
        """context: the ids before the first one stepped (IncrementalDetokenizer's)."""
        step = DecodeStream(ids=list(context), skip_special_tokens=True).step

        def locked_step(token_id: int) -> str | None:
            with lock:
                return step(backend, token_id)

        return locked_step

    return new_stream


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (),
                 stream: StreamStep | None = None, context: Sequence[int] = ()) -> None:
        """decode(ids) -> text, skipping special tokens and without clean-up of spaces (see Engine.decode);
        stream: a fresh incremental decoder over the same tokenizer (decode_streams), given the same context, used
        while it agrees; context: the ids before the first one added (the prompt's last few, vLLM's rule), decoded
        for context only: a decoder that strips a leading space (Metaspace: Llama 2, Mistral) strips it from the
        text's start, not from the first token of a continuation."""
        self._decode_ids = decode
        self._stream = stream
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = list(context)
        self._prefix_offset = 0  # window start: decoded for context only
        self._read_offset = len(self._ids)  # ids before this are already in self._text (or context)
        self.text = ""  # with stop strings: final text so far (after a stop string matched: the text before it)
        self.emitted = 0  # characters of self.text handed out
        self.stop_hit: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""

    def _new_text(self) -> str:
        """Text the latest ids add, or "" while it ends in an incomplete character."""
        if self._stream is not None:
            try:
                text = self._stream(self._ids[-1])
            except Exception:  # tokenizers' "invalid prefix": the decoder rewrote earlier text
                self._stream = None
            else:
                if text is not None:
                    self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                    return text
                # Nothing yet (an incomplete character, a skipped special token): the window scheme agrees unless
                # the decode changed earlier text; then the stream is out of step and the window scheme goes on.
                text = self._window_text()
                if text:
                    self._stream = None
                return text
        return self._window_text()

    def _window_text(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) > len(prefix_text) and not window_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return window_text[len(prefix_text) :]
        return ""

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        found = [(self.text.find(s, search_from), s) for s in self._stop]
        found = [(pos, s) for pos, s in found if pos >= 0]
        # The one that completes first; at a tie, the one the request lists first (vLLM's check_stop_strings: as if
        # the text came one character at a time), not the one that starts first
        return min(found, key=lambda hit: hit[0] + len(hit[1])) if found else None

    def _held_back_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        for length in range(min(self._max_stop_len - 1, len(self.text) - self.emitted), 0, -1):
            suffix = self.text[-length:]
            if any(s.startswith(suffix) for s in self._stop):
                return length
        return 0

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that became final. Sets stop_hit when a stop string completed."""
        if self.stop_hit is not None:
            raise RuntimeError("detokenizer already stopped")
        self._ids.append(token_id)
        return self._append(self._new_text())

    def flush(self) -> str:
        """At the end of a generation: release held-back text, including a trailing incomplete character."""
        if self.stop_hit is not None:
            return ""
        self._stream = None  # the offsets move past what the stream saw
        delta = ""
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            tail = self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self._ids)
            delta = self._append(tail)
        if self.stop_hit is not None:
            return delta
        return delta + self._release(len(self.text))

    def _append(self, new: str) -> str:
        if not self._stop:  # nothing is held back, and the text is not kept: += on it copies it whole every token
            return new
        if not new:
            return ""
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += new
        match = self._find_stop(search_from)
        if match is not None:
            position, self.stop_hit = match
            self.text = self.text[:position]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back_len())

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
