"""Choosing the next token from the model's logits: greedy, temperature, top-k, top-p.

Randomness is stateless per step: the token at output index i is drawn with a torch.Generator seeded from
(request seed, i). A request resumed on another worker from its token ids therefore draws exactly the numbers the
uninterrupted run would have drawn, with no generator state to ship. Sampling runs on the CPU in float32 so the
same seed gives the same choice on a CPU node and a GPU node (given the same logits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1
# Below this temperature sampling is greedy (vLLM's rule): logits / 1e-40 overflow float32 to inf, and the softmax of
# inf is NaN, which torch.multinomial refuses - one request with a tiny temperature would fail the engine's step.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


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


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sample_token draws from (1-D logits in, 1-D float32 probabilities out)."""
    scaled = logits.detach().to("cpu", torch.float32) / params.temperature
    probs = torch.softmax(filter_top_k(scaled, params.top_k), dim=-1)
    return top_p_probs(probs, params.top_p)


def sample_token(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Next token id from 1-D logits for output position `index`."""
    if params.greedy:
        return int(torch.argmax(logits))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(step_seed(params.seed, index))
    probs = sampling_probs(logits, params)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
