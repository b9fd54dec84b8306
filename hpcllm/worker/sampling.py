"""Choosing the next token from the model's logits: logit bias, penalties, grammar, greedy, temperature, min-p,
top-k, top-p.

The order is vLLM's (v1 sampler): logit_bias is added and the repetition, frequency and presence penalties applied
to the float32 logits, and a constrained request's grammar (structured outputs) sets the tokens it does not allow
to -inf (a reasoning model's only after its thinking: Thinking); greedy takes their argmax; otherwise temperature
scales them, min_p, top_k and top_p filter them, and the token is drawn. Penalties, grammar and thinking read the
request's tokens so far (TokenState, kept per request and updated per accepted token); the other steps read only the
logits and the parameters. A thinking budget, once spent, allows one token only (the end marker), so it does not
mask the logits: the end marker replaces whatever token was chosen (forced_or), and a greedy request with a budget
but no grammar or penalty still takes the step-wide argmax (SamplingParams.raw_argmax) and may speculate.

Randomness is stateless per step: the token at output index i is drawn with a torch.Generator seeded from
(request seed, i). A request resumed on another worker from its token ids therefore draws exactly the numbers the
uninterrupted run would have drawn, with no generator state to ship. Sampling runs on the CPU in float32 so the
same seed gives the same choice on a CPU node and a GPU node (given the same logits).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpcllm.worker.grammar import GrammarCompiler, GrammarState
from hpcllm.worker.protocol import FLOAT32_TINY

_MASK64 = (1 << 64) - 1
# Below this temperature sampling is greedy (vLLM's rule): logits / 1e-40 overflow float32 to inf, and the softmax of
# inf is NaN, which torch.multinomial refuses - one request with a tiny temperature would fail the engine's step.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Thinking:
    """How a reasoning model's output thinks before its answer (GenerateRequest.thinking): from the start (the prompt
    opened the thinking) or only when its first token is `start`, up to the first `end` token; at most `budget`
    tokens of it, then `end` is the only token allowed (vLLM's thinking_token_budget: forced_or)."""

    end: int
    start: int | None = None
    budget: int | None = None


class ThinkingState:
    """Where a request's output is: before its first token (it may open its thinking), thinking (counting the
    tokens), or in its answer (which a grammar constrains)."""

    def __init__(self, thinking: Thinking, output_ids: list[int]) -> None:
        self.rule = thinking
        self.opening = thinking.start is not None  # no token yet: the first says whether it thinks
        self.thinking = not self.opening
        self.thought = 0  # thinking tokens so far, the markers not counted (usage's reasoning_tokens)
        self.answer_from: int | None = 0 if self.opening else None  # output index of the answer's first token
        self._seen = 0
        if self.opening and output_ids:
            self.add(output_ids[0])
        if self.thinking:  # up to the end marker by list.index (a seed or rebuild of a long output: not per token)
            first = self._seen
            end = _index(output_ids, thinking.end, first)
            self.thought = end - first
            if end < len(output_ids):
                self.thinking, self.answer_from = False, end + 1
        self._seen = len(output_ids)

    def advance(self, output_ids: list[int]) -> "ThinkingState":
        """Take the output's tokens after those taken so far (output_ids: the whole output, which only grows): a
        kept state follows a long output at the cost of its new tokens, not of a rebuild that scans it all."""
        for token in output_ids[self._seen:]:
            self.add(token)
        return self

    def add(self, token: int) -> bool:
        """Take the next output token; whether it is part of the answer."""
        index, self._seen = self._seen, self._seen + 1
        if self.opening:
            self.opening = False
            self.thinking = token == self.rule.start
            self.answer_from = None if self.thinking else index
            return not self.thinking
        if not self.thinking:
            return True
        if token == self.rule.end:
            self.thinking, self.answer_from = False, index + 1
        else:
            self.thought += 1
        return False

    @property
    def forced(self) -> int | None:
        """The end marker once the thinking spent its budget (the only token allowed next), else None."""
        budget = self.rule.budget
        return self.rule.end if self.thinking and budget is not None and self.thought >= budget else None


def _index(ids: list[int], token: int, start: int) -> int:
    """The first index of token in ids from start, len(ids) if none."""
    try:
        return ids.index(token, start)
    except ValueError:
        return len(ids)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs added to the logits: a tuple, so the parameters stay immutable and cheap to pickle
    # (the model process gets them with every step it chooses tokens for).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Structured outputs: a grammar limits the tokens (the request keeps a GrammarState). The grammar itself is not
    # here: these parameters go to the model process with every step's choices, the grammar (KBs for a large schema)
    # once, with the request's state seed (TokenState.build).
    constrained: bool = False
    # A reasoning model's thinking before its answer: the grammar constrains only the answer, a budget bounds the
    # thinking (None: no grammar waits for it, no budget).
    thinking: Thinking | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether the choice depends on the tokens so far (a penalty): the request keeps TokenCounts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def reads_tokens(self) -> bool:
        """Whether the choice depends on the tokens so far (penalties, a grammar, a thinking budget): the request
        keeps a TokenState."""
        return self.penalized or self.constrained or self.thinking is not None

    @property
    def masks_logits(self) -> bool:
        """Whether the tokens so far change the logits the token is chosen from (penalties, a grammar): each row is
        adjusted on its own (adjusted_logits), and a speculated position would need the state advanced through the
        proposal. A thinking budget alone does not: once spent it replaces the chosen token (forced_or)."""
        return self.penalized or self.constrained

    @property
    def raw_argmax(self) -> bool:
        """Whether the token is the argmax of the model's logits as they are (greedy, nothing added to them): one
        argmax over a whole step's logits serves every such request (a spent thinking budget then replaces it:
        forced_or)."""
        return self.greedy and not self.logit_bias and not self.masks_logits


class TokenCounts:
    """What the penalties read about a request's tokens (vLLM's prompt mask and output bin counts): built once from
    its token ids (a new, resumed or migrated-in request alike), then updated per accepted output token."""

    def __init__(self, vocab_size: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool)
        self.in_prompt[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.output = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab_size).float()

    def add(self, token: int) -> None:
        self.output[token] += 1


@dataclass
class TokenState:
    """What choosing a request's next token reads of its tokens so far: a penalized request's TokenCounts and a
    constrained one's GrammarState. Built from its token ids (a new, resumed, preempted or migrated-in request alike),
    then updated per accepted output token."""

    counts: TokenCounts | None = None
    grammar: GrammarState | None = None
    thinking: ThinkingState | None = None

    @classmethod
    def build(cls, params: SamplingParams, vocab_size: int, prompt_ids: list[int], output_ids: list[int],
              grammar: str | None = None, compiler: GrammarCompiler | None = None) -> "TokenState":
        """grammar, compiler: a constrained request's grammar text and the model's grammar.grammar_compiler."""
        if params.constrained and grammar is None:
            raise ValueError("a constrained request's TokenState needs its grammar")
        thinking = ThinkingState(params.thinking, output_ids) if params.thinking is not None else None
        return cls(TokenCounts(vocab_size, prompt_ids, output_ids) if params.penalized else None,
                   GrammarState(grammar, compiler, answer_ids(thinking, output_ids)) if params.constrained else None,
                   thinking)

    def add(self, token: int) -> None:
        if self.counts is not None:
            self.counts.add(token)
        in_answer = self.thinking.add(token) if self.thinking is not None else True
        if self.grammar is not None and in_answer:
            self.grammar.add(token)

    @property
    def forced(self) -> int | None:
        """The only token allowed next, whatever the logits (a spent thinking budget's end marker), else None."""
        return self.thinking.forced if self.thinking is not None else None


def forced_or(state: TokenState | ThinkingState | None, token: int) -> int:
    """The token a request takes where `token` was chosen from its logits: its thinking's end marker once the budget
    is spent (masking all but one token would pick that one, greedy or sampled), else `token`."""
    forced = state.forced if state is not None else None
    return token if forced is None else forced


def answer_ids(thinking: ThinkingState | None, output_ids: list[int]) -> list[int]:
    """The output's answer tokens (the grammar's), after its thinking (thinking: its state after output_ids)."""
    if thinking is None:
        return output_ids
    return output_ids[thinking.answer_from:] if thinking.answer_from is not None else []


def random_seed() -> int:
    """A seed for requests that gave none; it is recorded so the request can still be resumed elsewhere."""
    return random.SystemRandom().randrange(2**63)


def step_seed(seed: int, index: int) -> int:
    """Seed for output index `index`: splitmix64 of (seed, index), so neighbouring steps get unrelated streams."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p; renormalise.

    The most likely token is always kept, so a tiny top_p degenerates to greedy.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    beyond = mass_before >= top_p  # a top_p below float32's range compares as 0.0: the first token must stay anyway
    beyond[..., 0] = False
    sorted_probs = sorted_probs.masked_fill(beyond, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Set to -inf the logits of tokens less likely than min_p times the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def apply_penalties(logits: torch.Tensor, params: SamplingParams, counts: TokenCounts) -> torch.Tensor:
    """vLLM's penalties (new tensor; float32 logits, float64 where repetition takes one out of float32's range):
    repetition over prompt and output tokens (a positive logit is divided by it, another multiplied), then frequency
    (times the count) and presence over output tokens only."""
    in_output = counts.output > 0
    if params.repetition_penalty != 1.0:
        penalties = torch.where(counts.in_prompt | in_output, params.repetition_penalty, 1.0)
        penalized = logits * torch.where(logits > 0, 1.0 / penalties, penalties)
        overflowed = logits.isfinite() & ~penalized.isfinite()
        underflowed = (logits != 0) & (penalized.abs() < FLOAT32_TINY)
        if (overflowed | underflowed).any():
            # An extreme penalty (within the API's bounds: protocol.float32_factor) overflowed a finite logit to
            # +-inf (NaN in the softmax; saturating ties the overflowed logits, losing their order) or took one
            # below float32's normal numbers (small logits rounded to 0 tie, greedy takes the lowest id): this row
            # in float64, where no float32 logit times such a factor leaves the range. Other rows stay float32,
            # bit for bit.
            wide, penalties = logits.double(), penalties.double()
            penalized = wide * torch.where(wide > 0, 1.0 / penalties, penalties)
        logits = penalized
    if params.frequency_penalty != 0.0:
        logits = logits - params.frequency_penalty * counts.output
    if params.presence_penalty != 0.0:
        logits = logits - params.presence_penalty * in_output.float()
    return logits


# Per byte value, which of its 8 bits are 0, lowest first: llguidance's bitmask (token i: bit i % 8 of byte i // 8)
# becomes the tokens to block by one gather (a shift and mask per bit cost more than the masking itself).
_REFUSED_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) == 0


def apply_grammar(logits: torch.Tensor, grammar: GrammarState, also: int | None = None) -> torch.Tensor:
    """Set to -inf the logits of the tokens the grammar does not allow next (new tensor; 1-D float32 logits), token
    `also` allowed besides them. Rows wider than the grammar's vocabulary (padded embeddings) allow none of the
    extra tokens.

    Not llguidance.torch's apply_token_bitmask_inplace: no faster than this on the CPU, and its kernel is
    torch.compile'd, which stalls the first constrained step of every process for seconds and needs a C++ compiler
    on each node (docs/worker.md, structured outputs)."""
    bits = torch.frombuffer(bytearray(grammar.bitmask()), dtype=torch.uint8)
    refused = _REFUSED_BITS.index_select(0, bits.int()).flatten()
    width = logits.shape[-1]
    if len(refused) < width:
        refused = torch.cat([refused, refused.new_ones(width - len(refused))])
    refused = refused[:width]
    if also is not None:
        refused[also] = False
    return logits.masked_fill(refused, float("-inf"))


def apply_thinking_grammar(logits: torch.Tensor, state: TokenState) -> torch.Tensor:
    """A constrained thinking request's grammar: while it thinks, none; before its first token, what the grammar
    allows and the start marker; in its answer, what the grammar allows. (A spent budget: forced_or.)"""
    thinking = state.thinking
    if thinking.thinking:
        return logits
    return apply_grammar(logits, state.grammar, also=thinking.rule.start if thinking.opening else None)


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, state: TokenState | None = None) -> torch.Tensor:
    """The float32 CPU logits the token is chosen from (float64 where a penalty overflows float32: apply_penalties):
    logit_bias added, then the penalties, then the grammar's mask (a thinking request's: apply_thinking_grammar)
    (never in place: the caller's logits also give the logprobs, which are of the raw distribution)."""
    logits = logits.detach().to("cpu", torch.float32)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids), torch.tensor(biases, dtype=torch.float32))
    if params.masks_logits and state is None:
        raise ValueError("penalties and grammars need the request's TokenState")
    if params.penalized:
        logits = apply_penalties(logits, params, state.counts)
    if params.constrained and params.thinking is not None:
        logits = apply_thinking_grammar(logits, state)
    elif params.constrained:
        logits = apply_grammar(logits, state.grammar)
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams, state: TokenState | None = None) -> torch.Tensor:
    """The distribution sample_token draws from (1-D logits in, 1-D float32 probabilities out)."""
    adjusted = adjusted_logits(logits, params, state)
    # From the largest logit down (the softmax's own shift), so a temperature below 1 cannot overflow a large logit
    # to inf: the largest becomes 0, the others at most -inf. A float64 row (apply_penalties) is float32 from here:
    # what float32 cannot hold of its differences is below its range, a probability of 0 anyway.
    scaled = filter_min_p(((adjusted - adjusted.max()) / params.temperature).float(), params.min_p)
    probs = torch.softmax(filter_top_k(scaled, params.top_k), dim=-1)
    return top_p_probs(probs, params.top_p)


def sample_token(logits: torch.Tensor, params: SamplingParams, index: int, state: TokenState | None = None) -> int:
    """Next token id from 1-D logits for output position `index` (state: the request's, when params.reads_tokens;
    a spent thinking budget's end marker without a look at the logits)."""
    forced = state.forced if state is not None else None
    if forced is not None:
        return forced
    if params.greedy:
        return int(torch.argmax(logits if params.raw_argmax else adjusted_logits(logits, params, state)))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(step_seed(params.seed, index))
    probs = sampling_probs(logits, params, state)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def verify_proposal(proposal: list[int], choose: Callable[[int], int], thinking: ThinkingState | None = None
                    ) -> list[int]:
    """The tokens a speculative chunk emits (Engine._commit_speculative): fed position i's token chosen as decoding
    one by one chooses it there (choose(i): the argmax, or sample_token with the seed of its output index), kept
    while it equals proposal[i], then the first that differs (or the one after the whole proposal).
    thinking: a thinking budget's request's ThinkingState as of the chunk's first position, advanced here through
    the tokens chosen (the caller's copy), so a spent budget's end marker replaces the token at the very position
    decoding one by one forces it (forced_or); a request whose logits the tokens change (masks_logits) never
    speculates.

    For a sampled request this is rejection sampling for a draft that proposes its token for sure (q(x) = 1):
    x is kept with probability p(x), else the token is y != x with probability p(y) / (1 - p(x)), p with x removed
    and renormalized - exactly the target distribution, drawn with the very random numbers of decoding one by one,
    so a seed gives the same output with speculation on or off."""
    def at(position: int) -> int:
        forced = thinking.forced if thinking is not None else None
        token = choose(position) if forced is None else forced
        if thinking is not None:
            thinking.add(token)
        return token

    tokens = [at(0)]
    while len(tokens) <= len(proposal) and tokens[-1] == proposal[len(tokens) - 1]:
        tokens.append(at(len(tokens)))
    return tokens
