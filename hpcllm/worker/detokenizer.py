"""Incremental detokenization with stop strings, for streaming.

Text is produced by decoding a window of the output ids and emitting the new suffix (the prefix-offset scheme of
TGI and vLLM): decoding whole sequences rather than single tokens gets merged tokens and multi-byte characters
right, and a suffix ending in U+FFFD (an incomplete UTF-8 sequence split across tokens) is held back until the
next token completes it. The window keeps each step O(1) instead of re-decoding the whole output.

Stop strings follow OpenAI semantics: the output ends just before the first occurrence of any stop string, and
the stop string itself is never emitted. Text that could still turn out to be the start of a stop string is held
back until it cannot; `flush` releases what is held when the generation ends for another reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text with special tokens skipped and no clean-up of spaces, as `tokenizer.decode` gives it.

    For a fast tokenizer whose decoding is transformers' own, that call is its Rust backend's decode wrapped in
    ~9 us of Python: the backend is called directly (the detokenizer decodes twice per generated token, on the
    engine thread). Any other tokenizer goes through `decode`."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the plain call
        TokenizersBackend = None
    if TokenizersBackend is not None and type(tokenizer)._decode is TokenizersBackend._decode:
        return functools.partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        """decode(ids) -> text, skipping special tokens and without clean-up of spaces (see Engine.decode)."""
        self._decode_ids = decode
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoded for context only
        self._read_offset = 0  # ids before this are already in self._text
        self.text = ""  # final text so far (after a stop string matched: the text before it)
        self.emitted = 0  # characters of self.text handed out
        self.stop_hit: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""

    def _new_text(self) -> str:
        """Text the latest ids add, or "" while it ends in an incomplete character."""
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
        return min(found) if found else None

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
        if not new:
            return ""
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += new
        if not self._stop:
            return self._release(len(self.text))
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
