"""Serving across ranks: rank 0 (the lead) schedules and broadcasts each step; the other ranks (followers) run the
same forward on their shards.

The seam is a plain picklable `Step` (what to run) and `ShardRunner.run(step)` (run it on this rank's shard). The
lead's scheduler never talks to MPI except through `StepChannel.send`, and a follower is just `follow(channel,
runner)`: any engine that can describe one iteration as a Step can drive a TP model. Today's engine
(hpcllm.worker.engine.Engine, one request per forward) is driven by `TensorParallelEngine`, which replaces its
`_forward`. A batched engine's `ModelRunner.step(batch)` plugs in the same way: its batch description becomes a
Step kind, `ShardRunner` gets the matching `run` branch, and the lead sends the step before running it itself
(docs/tensor-parallel.md).

Only the lead samples: followers compute the same logits (the lm_head all-gather gives every rank all of them) but
ignore them, and the next step carries the token ids the lead chose, so the ranks cannot diverge.

Transport: a step is pickled and broadcast in two collectives, a fixed-size header (length) and the payload. Idle
followers poll the header's non-blocking broadcast with short, growing sleeps (at most 1 ms) instead of blocking
in MPI (OpenMPI's blocking calls spin a core, which a lead on the same cores would lose).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORWARD, STOP = "forward", "stop"
_IDLE_POLL_MAX_S = 0.001  # longest sleep between polls of an idle follower (adds at most this to a step's start)
_POLL_STEP_S = 0.00005  # sleeps grow by this much per empty poll: short right after a step, when the next is due


@dataclass(frozen=True)
class Step:
    """One iteration of the lead's scheduler, as every rank must run it.

    kind=forward: run `token_ids` at positions start.. for request `key` (start 0: a new KV cache), after dropping
    the caches of `release` (requests that finished since the last step). kind=stop: followers return.
    """

    kind: str
    key: str = ""
    token_ids: tuple[int, ...] = ()
    start: int = 0
    release: tuple[str, ...] = ()


class ShardRunner:
    """Runs steps on this rank's shard of the model; holds the KV caches of the requests in flight (per rank: each
    rank caches the keys/values of its own heads)."""

    def __init__(self, model):
        from hpcllm.worker.engine import _forward_kwargs

        self.model = model.eval()
        self.device = model.get_input_embeddings().weight.device
        self.caches: dict[str, Any] = {}
        self._kwargs = _forward_kwargs(model)

    def run(self, step: Step) -> torch.Tensor | None:
        for key in step.release:
            self.caches.pop(key, None)
        if step.kind != FORWARD:
            return None
        from transformers import DynamicCache

        if step.start == 0 or step.key not in self.caches:
            self.caches[step.key] = DynamicCache(config=self.model.config)
        ids = torch.tensor([step.token_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(step.start, step.start + len(step.token_ids), dtype=torch.long,
                                 device=self.device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                             **self._kwargs(self.caches[step.key]))
        return out.logits[0, -1]


class StepChannel:
    """Broadcast of Steps from rank 0 over an mpi4py communicator."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank = comm.Get_rank()

    def send(self, step: Step) -> None:
        payload = np.frombuffer(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        header = np.array([payload.size], dtype=np.int64)
        self.comm.Ibcast(header, root=0).Wait()
        self.comm.Bcast(payload.copy(), root=0)

    def receive(self) -> Step:
        header = np.zeros(1, dtype=np.int64)
        request = self.comm.Ibcast(header, root=0)
        pause = 0.0
        while not request.Test():  # sleeping, not spinning: ranks may share cores with the lead
            time.sleep(pause)
            pause = min(_IDLE_POLL_MAX_S, pause + _POLL_STEP_S)
        payload = np.empty(int(header[0]), dtype=np.uint8)
        self.comm.Bcast(payload, root=0)
        return pickle.loads(payload.tobytes())


def follow(channel: StepChannel, runner: ShardRunner) -> int:
    """A follower's loop: run every step the lead sends until it sends stop; returns the number of steps run."""
    steps = 0
    while True:
        step = channel.receive()
        if step.kind == STOP:
            return steps
        runner.run(step)
        steps += 1


@dataclass
class LeadRunner:
    """The lead's side: send a step, then run it on the lead's own shard (the collectives inside the forward meet
    the followers' calls of the same step)."""

    channel: StepChannel
    runner: ShardRunner
    _released: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: bool = False

    def forward(self, key: str, token_ids: list[int], start: int) -> torch.Tensor:
        with self._lock:
            release, self._released = tuple(self._released), []
        step = Step(FORWARD, key, tuple(token_ids), start, release)
        self.channel.send(step)
        return self.runner.run(step)

    def release(self, key: str) -> None:
        """Forget a request's caches on every rank, with the next step (callable from any thread: MPI is only
        called from the thread that runs forwards)."""
        with self._lock:
            self._released.append(key)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.channel.send(Step(STOP))


def greedy_generate(lead: LeadRunner, prompt_ids: list[int], max_new_tokens: int, key: str = "greedy",
                    eos_token_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy decoding through the lead (prefill in one step, then one step per token): the reference check that
    a TP model generates what transformers' generate does."""
    ids = list(prompt_ids)
    logits = lead.forward(key, ids, 0)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        out.append(token)
        if token in eos_token_ids or len(out) == max_new_tokens:
            break
        logits = lead.forward(key, [token], len(ids) + len(out) - 1)
    lead.release(key)
    return out


def tensor_parallel_engine_class():
    """Engine whose forwards run on every rank (imported lazily: the worker engine imports transformers)."""
    from hpcllm.worker.engine import Engine

    class TensorParallelEngine(Engine):
        """The worker engine on rank 0 of a TP group: scheduling, sampling and HTTP unchanged; each forward is a
        Step broadcast to the followers. Request caches live in the ShardRunners (keyed by request id)."""

        def __init__(self, lead: LeadRunner, tokenizer, **options):
            super().__init__(lead.runner.model, tokenizer, **options)
            self.lead = lead

        def _forward(self, req, chunk: list[int], start: int) -> torch.Tensor:
            return self.lead.forward(req.request_id, chunk, start)

        def _finish(self, req, reason: str, *args, **kwargs) -> None:
            super()._finish(req, reason, *args, **kwargs)
            self.lead.release(req.request_id)

        def shutdown(self, timeout: float = 30.0) -> None:
            super().shutdown(timeout)
            self.lead.stop()  # after the engine thread stopped: MPI stays on one thread

    return TensorParallelEngine
