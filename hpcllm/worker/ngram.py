"""N-gram prompt lookup: the model-free proposer of speculative decoding (vLLM's `method = "ngram"`).

A decoding request whose last n ids (n from max_n down to min_n) occurred earlier in its prompt + output proposes
the ids that followed that occurrence, up to k of them. The engine feeds the request's last id and the proposal in
one chunk and keeps the proposal's longest prefix that decoding one by one would have produced (Engine,
docs/worker.md "Speculative decoding"): outputs that copy their input (summaries, edits, retrieval answers) then
take several tokens per step. The earliest occurrence is used: a looping output's first loop has the most ids after it.

SpeculationRecord is the per-request rule that keeps speculation from costing where proposals are not accepted
(docs/worker.md "Speculative decoding"): each request's acceptance rate, the proposal length it pays for at the
step's batch size, proposals only watched (scored against the tokens decoded next, never verified) while none
pays, and an exponential back-off of the lookups while none pays or they find nothing (vLLM's ngram has no such
rule; TensorRT-LLM's acceptance_rate_threshold and SGLang's adaptive EAGLE steps are the same idea).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

_ITEM = array("i").itemsize
# What a verification chunk costs, in output tokens of the request (the expected accepted tokens must beat it),
# per decode in the step: each proposed position, and the chunk itself per other decode (its rows' padded queries
# and, on CPU, the grouped call of the step's verifications beside the decodes' one). Cheap beside a lone decode
# (the step reads the weights anyway), dear in a batch that already shares that read. Fitted to bench/spec_decode.py
# on the CPU (docs/worker.md): the chunk's cost was 0.07 while each verification was attended on its own call
# (2026-12-06, before the grouped call; the step's forward CPU time it adds halved with it); on a GPU proposed
# positions cost less, so there the rule errs on the side of proposing too little.
POSITION_COST_PER_DECODE = 0.05
CHUNK_COST_PER_OTHER_DECODE = 0.025
# The acceptance record: decayed sums of accepted and verified positions (this weight per proposal), starting from
# 0.75 of one position (a new request speculates at once unless many decode beside it).
ACCEPTANCE_DECAY = 0.25
PRIOR_RATE = 0.75
MAX_BACKOFF_STEPS = 16  # a request whose proposals do not pay looks one up (to watch it) at least this often
MAX_LOOKUP_BACKOFF_STEPS = 8  # a request whose lookups find nothing looks again at least this often
LOOKUP_MISSES = 3  # lookups in a row that find nothing before a request backs off (an output that copies in
#                   short runs misses every other lookup, and must not back off into the misses' phase)


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


@dataclass
class SpeculationRecord:
    """One request's speculation: its acceptance rate (decayed sums of accepted and verified positions: a position
    is verified when it is accepted or is the first rejected one) and its back-off (it looks up a proposal only at
    steps that are multiples of `backoff`, so requests backed off alike look up at the same steps)."""

    accepted: float = PRIOR_RATE
    verified: float = 1.0
    backoff: int = 1
    misses: int = 0  # lookups in a row that found nothing
    # A proposal not verified (none paid) but watched: the ids proposed to follow the first `watched_at` ids.
    watched: list[int] = field(default_factory=list)
    watched_at: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.verified

    def due(self, step: int) -> bool:
        return step % self.backoff == 0

    def length(self, tokens: int, decodes: int) -> int:
        """The proposal length (at most `tokens`) whose expected accepted tokens (rate + rate^2 + ...: each position
        reached and accepted independently) beat its cost at this many decodes in the step by the most; 0 where
        none pays."""
        position, chunk = POSITION_COST_PER_DECODE * decodes, CHUNK_COST_PER_OTHER_DECODE * max(0, decodes - 1)
        best, best_net, expected, reached = 0, 0.0, 0.0, 1.0
        for length in range(1, tokens + 1):
            reached *= self.rate
            expected += reached
            net = expected - position * length - chunk
            if net > best_net:
                best, best_net = length, net
        return best

    def observe(self, proposed: int, accepted: int, tokens: int, decodes: int) -> None:
        """A verified proposal (k = tokens): update the rate; back off while proposing does not pay, else propose
        every step."""
        verified = accepted + (accepted < proposed)
        self.misses = 0
        self.accepted += ACCEPTANCE_DECAY * (accepted - self.accepted)
        self.verified += ACCEPTANCE_DECAY * (verified - self.verified)
        if self.length(tokens, decodes):
            self.backoff = 1
        else:
            self.back_off(MAX_BACKOFF_STEPS)

    def watch(self, proposal: list[int], at: int) -> None:
        """Keep a proposal that no length paid to verify, to score it against the ids decoded after `at`."""
        if not self.watched:
            self.watched, self.watched_at = proposal, at

    def score_watched(self, ids: list[int], tokens: int, decodes: int) -> None:
        """Score the watched proposal once the ids decoded since differ from it or cover it, as if verified: its
        acceptance, measured without a verification chunk's cost (greedy: exactly the verification's; sampled:
        the same draws)."""
        if not self.watched:
            return
        decoded = ids[self.watched_at:self.watched_at + len(self.watched)]
        accepted = next((i for i, (a, b) in enumerate(zip(decoded, self.watched)) if a != b), len(decoded))
        if accepted < len(decoded) or len(decoded) == len(self.watched):
            proposed, self.watched = len(self.watched), []
            self.observe(proposed, accepted, tokens, decodes)

    def missed(self) -> None:
        """A lookup found nothing: after LOOKUP_MISSES in a row, look again half as often."""
        self.misses += 1
        if self.misses >= LOOKUP_MISSES:
            self.back_off(MAX_LOOKUP_BACKOFF_STEPS)

    def back_off(self, most: int) -> None:
        """Nothing worth proposing (no match, or a rate that does not pay): look again half as often."""
        self.backoff = max(self.backoff, min(most, 2 * self.backoff))
