"""N-gram prompt lookup: the model-free proposer of speculative decoding (vLLM's `method = "ngram"`).

A decoding request whose last n ids (n from max_n down to min_n) occurred earlier in its prompt + output proposes
the ids that followed that occurrence, up to k of them. The engine feeds the request's last id and the proposal in
one chunk and keeps the proposal's longest prefix that greedy decoding would have produced (Engine, docs/worker.md
"Speculative decoding"): outputs that copy their input (summaries, edits, retrieval answers) then take several tokens
per step. The earliest occurrence is used: a looping output's first loop has the most ids after it.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

_ITEM = array("i").itemsize


@dataclass(frozen=True)
class NgramProposer:
    tokens: int  # k: the most ids proposed per step
    max_n: int = 4  # vLLM's prompt_lookup_max
    min_n: int = 2  # vLLM's prompt_lookup_min

    def __post_init__(self) -> None:
        if self.tokens < 1 or not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram speculation needs tokens >= 1 and 1 <= min_n <= max_n, not tokens={self.tokens}, "
                             f"min_n={self.min_n}, max_n={self.max_n}")

    def propose(self, ids: list[int], limit: int) -> list[int]:
        """At most min(tokens, limit) ids that followed the earliest earlier occurrence of the longest suffix of
        `ids` (max_n..min_n ids long); [] when none occurs."""
        limit = min(self.tokens, limit)
        if limit < 1 or len(ids) <= self.min_n:
            return []
        packed = array("i", ids).tobytes()  # bytes.find: the search runs in C
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            start = _first_occurrence(packed, packed[-n * _ITEM:], len(ids) - n)
            if start is not None:
                return ids[start + n:start + n + limit]
        return []


def _first_occurrence(packed: bytes, pattern: bytes, before: int) -> int | None:
    """The first id index i < before where `pattern` starts in `packed` (an array of ids), aligned to an id."""
    at = packed.find(pattern, 0, (before - 1) * _ITEM + len(pattern))
    while at >= 0 and at % _ITEM:  # a match straddling two ids: look further on
        at = packed.find(pattern, at + 1, (before - 1) * _ITEM + len(pattern))
    return at // _ITEM if at >= 0 else None
