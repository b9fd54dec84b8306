"""Presence and frequency penalties over a resumed request's earlier output, for vLLM (a vLLM logits processor).

vLLM counts presence and frequency penalties over a request's own output tokens. hpcllm submits a request resumed
or migrated onto a vLLM worker (and one whose migration was abandoned) as prompt + the output so far
(vllm_engine.VllmEngine._generate), so vLLM would count only what it generates after that submission: a request told
not to repeat itself would repeat what it said before the move. The engine passes the earlier output ids in
SamplingParams.extra_args[PRIOR_OUTPUT_KEY], and this processor adds what vLLM leaves out, so that the penalised
logits are vLLM's over the whole output: frequency_penalty times each earlier token's count, and presence_penalty for
an earlier token until vLLM's own output holds it too (from then on vLLM counts its presence).

vLLM's V1 model runner applies such processors before its penalties, and its repetition penalty (over prompt and
output: the earlier output is in the prompt, so it is penalised as it should be) divides or multiplies a logit, so
the missing amount cannot simply be subtracted first: each affected logit is set to the value that the repetition
penalty turns into the right one. Model Runner V2 takes processors of another interface; none is registered there
(vllm_engine.build_llm_engine, docs/vllm.md).

Imported only by vLLM's processes (the vLLM interpreter), never by the gateway's.
"""

from __future__ import annotations

from collections import Counter

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

PRIOR_OUTPUT_KEY = "hpcllm_prior_output_ids"


def prior_output_args(output_ids: list[int], presence_penalty: float, frequency_penalty: float) -> dict | None:
    """SamplingParams.extra_args for a submission after output_ids were generated (None: nothing to add)."""
    if not output_ids or not (presence_penalty or frequency_penalty):
        return None
    return {PRIOR_OUTPUT_KEY: list(output_ids)}


class PriorOutputPenalties(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # penalties change which token is the most likely

    def new_req_logits_processor(self, params: SamplingParams) -> PriorOutputPenalty | None:
        prior = (params.extra_args or {}).get(PRIOR_OUTPUT_KEY)
        if not prior or not (params.presence_penalty or params.frequency_penalty):
            return None
        return PriorOutputPenalty(prior, params.presence_penalty, params.frequency_penalty, params.repetition_penalty)


class PriorOutputPenalty:
    """One request's missing penalties, called each step with vLLM's (growing) output ids and the request's row."""

    def __init__(self, prior: list[int], presence: float, frequency: float, repetition: float):
        counts = Counter(prior)
        self._ids = list(counts)
        self._frequency_part = [frequency * counts[token] for token in self._ids]
        self._presence = presence
        self._presence_missing = set(self._ids)  # earlier tokens vLLM's own output does not hold yet
        self._repetition = repetition
        self._looked_at = 0  # vLLM output ids already checked against _presence_missing
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        new = output_ids[self._looked_at:]
        self._looked_at = len(output_ids)
        if self._presence_missing.intersection(new):
            self._presence_missing.difference_update(new)
            self._tensors = None  # vLLM counts these tokens' presence now
        ids, missing = self._on(logits.device)
        r = self._repetition
        logit = logits[ids]
        target = torch.where(logit > 0, logit / r, logit * r) - missing  # the whole output's penalties
        logits[ids] = torch.where(target > 0, target * r, target / r)  # what vLLM's repetition penalty maps to it
        return logits

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None or self._tensors[0].device != device:
            missing = [part + (self._presence if token in self._presence_missing else 0.0)
                       for token, part in zip(self._ids, self._frequency_part)]
            self._tensors = (torch.tensor(self._ids, dtype=torch.long, device=device),
                             torch.tensor(missing, dtype=torch.float32, device=device))
        return self._tensors
