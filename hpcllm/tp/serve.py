"""Serving across ranks: rank 0 (the lead) schedules and broadcasts each step; the other ranks (followers) run the
same forward on their shards.

The seam is a plain picklable `Step` (what to run) and `ShardRunner.run(step)` (run it on this rank's shard). The
lead's scheduler never talks to MPI except through `StepChannel.send`, and a follower is just `follow(channel,
runner)`: any engine that can describe one iteration as a Step can drive a TP model. The worker's batched engine
(hpcllm.worker.engine.Engine) is driven by `TensorParallelEngine`: at start it sends a RUNNER step (each follower
builds the same kind of ModelRunner, with the lead's block budget), then each `_forward(StepBatch)` is sent as a
BATCH step before the lead runs it itself (docs/tensor-parallel.md). Block tables come from the lead's scheduler,
so every rank writes the same KV blocks, each of its own heads. FORWARD steps (one request, its own cache) serve
`greedy_generate`, the reference check.

Only the lead samples: followers compute the same logits (the lm_head all-gather gives every rank all of them) but
ignore them, and the next step carries the token ids the lead chose, so the ranks cannot diverge.

Transport: a step is pickled and broadcast in two collectives, a fixed-size header (length) and the payload. Idle
followers poll the header's non-blocking broadcast with short, growing sleeps (at most 1 ms) instead of blocking
in MPI (OpenMPI's blocking calls spin a core, which a lead on the same cores would lose).
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcllm.errors import ConfigError

log = logging.getLogger(__name__)

FORWARD, STOP = "forward", "stop"
# The batched engine's kinds: RUNNER builds the rank's ModelRunner (hpcllm.worker.runner) with the lead's options,
# BATCH runs one StepBatch on it, EMBED runs the base model over a piece of an embeddings request's inputs.
RUNNER, BATCH, EMBED = "runner", "batch", "embed"
_IDLE_POLL_MAX_S = 0.001  # longest sleep between polls of an idle follower (adds at most this to a step's start)
_POLL_STEP_S = 0.00005  # sleeps grow by this much per empty poll: short right after a step, when the next is due


@dataclass(frozen=True)
class Step:
    """One iteration of the lead's scheduler, as every rank must run it.

    kind=forward: run `token_ids` at positions start.. for request `key` (start 0: a new KV cache), after dropping
    the caches of `release` (requests that finished since the last step). kind=runner: build the batched
    engine's runner with `options`; kind=batch: run `batch` (a hpcllm.worker.runner.StepBatch) on it; kind=embed:
    the base model over the inputs in `batch` (runner.last_hidden_states). kind=stop: followers return.
    """

    kind: str
    key: str = ""
    token_ids: tuple[int, ...] = ()
    start: int = 0
    release: tuple[str, ...] = ()
    batch: Any = None
    options: tuple[tuple[str, Any], ...] = ()


class ShardRunner:
    """Runs steps on this rank's shard of the model; holds the KV caches of the requests in flight (per rank: each
    rank caches the keys/values of its own heads)."""

    def __init__(self, model):
        from hpcllm.worker.runner import _forward_kwargs

        self.model = model.eval()
        self.device = model.get_input_embeddings().weight.device
        self.caches: dict[str, Any] = {}
        self._kwargs = _forward_kwargs(model)
        self.batch_runner = None  # the batched engine's ModelRunner on this rank (a RUNNER step builds it)

    def run(self, step: Step) -> torch.Tensor | None:
        for key in step.release:
            self.caches.pop(key, None)
        if step.kind == RUNNER:
            from hpcllm.worker.runner import make_runner

            self.batch_runner = make_runner(self.model, **dict(step.options))
            self.batch_runner.keeps_scores = False  # only the lead answers prompt logprobs
            return None
        if step.kind == BATCH:
            with torch.inference_mode():  # as the lead's engine thread runs it (no autograd state per step)
                return self.batch_runner.step(step.batch)
        if step.kind == EMBED:
            return self._embed(step.batch)
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


    def _embed(self, inputs: list[list[int]]) -> torch.Tensor:
        from hpcllm.worker.runner import last_hidden_states

        with torch.inference_mode():  # the lead's forward, padded the same way: the same all-reduces
            return last_hidden_states(self.model, inputs)


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
        run_or_abort(channel, lambda: runner.run(step), step.kind)
        steps += 1


def run_or_abort(channel: StepChannel, action, kind: str):
    """Run one step's share on this rank; if it fails (out of memory, a device error), end every rank: the others
    are inside the step's collectives waiting for this one, and an MPI job whose rank merely exits waits forever."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - any failure leaves the step's collectives unmatched
        message = (f"rank {channel.rank}: the {kind} step failed ({type(exc).__name__}: {exc}); aborting every "
                   f"rank of the tensor-parallel instance")
        log.error(message)
        print(f"error: {message}", flush=True)
        channel.comm.Abort(1)
        raise


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
        return run_or_abort(self.channel, lambda: self.runner.run(step), FORWARD)

    def release(self, key: str) -> None:
        """Forget a request's caches on every rank, with the next step (callable from any thread: MPI is only
        called from the thread that runs forwards)."""
        with self._lock:
            self._released.append(key)

    def stop(self) -> None:
        if not self.stopped:
            self.channel.send(Step(STOP))
            self.stopped = True  # only once sent: a lead whose send failed must still abort its followers


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

    from hpcllm.worker.runner import PagedRunner

    class TensorParallelEngine(Engine):
        """The worker engine on rank 0 of a TP group: scheduling, KV block allocation, sampling and HTTP unchanged;
        each StepBatch is broadcast to the followers, whose runners (built with the lead's runner options) write the
        same KV blocks of their own heads and compute their shard of the same forward."""

        # A runtime load would reach the lead's runner only: the followers' shards need the adapters' slices.
        lora_refusal = ("LoRA adapters are not supported with tensor parallelism yet; serve them on a "
                        "tensor_parallel = 1 deployment")

        def __init__(self, lead: LeadRunner, tokenizer, **options):
            if options.pop("model_process", False):  # the forward is already spread over the ranks' processes
                raise ConfigError("[worker] model_process cannot be combined with tensor parallelism; set it false")
            if options.pop("cuda_graphs", False):  # the followers' steps would have to be captured alike
                raise ConfigError("[worker] cuda_graphs is not supported with tensor parallelism yet; set it false")
            if options.get("lora_adapters"):  # the followers' shards would need the adapters' slices
                raise ConfigError(self.lora_refusal)
            super().__init__(lead.runner.model, tokenizer, **options)
            self.lead = lead
            lead.runner.batch_runner = self.runner
            if isinstance(self.runner, PagedRunner):
                runner_options = {"batching": "paged", "num_blocks": self.runner.pool.max_blocks,
                                  "block_size": self.runner.block_size, "fast_path": self.runner.use_fast_path}
            else:
                runner_options = {"batching": "sequential", "num_blocks": 0, "block_size": self.runner.block_size}
            lead.channel.send(Step(RUNNER, options=tuple(runner_options.items())))

        def _forward(self, batch) -> torch.Tensor:
            self.lead.channel.send(Step(BATCH, batch=batch))
            return run_or_abort(self.lead.channel, lambda: self.runner.step(batch), BATCH)

        def _pool(self, inputs: list[list[int]]) -> list[list[float]]:
            self.lead.channel.send(Step(EMBED, batch=inputs))  # the base model's all-reduces span every rank
            return run_or_abort(self.lead.channel, lambda: super(TensorParallelEngine, self)._pool(inputs), EMBED)

        def shutdown(self, timeout: float = 30.0) -> None:
            super().shutdown(timeout)
            if self._thread is not None and self._thread.is_alive():
                # Stuck in a step's collectives (a hung step): a stop step would wait behind it forever.
                print("error: the engine thread is stuck in a tensor-parallel step; aborting every rank of the "
                      "instance", file=sys.stderr, flush=True)
                self.lead.channel.comm.Abort(1)
            self.lead.stop()  # after the engine thread stopped: MPI stays on one thread

    return TensorParallelEngine
