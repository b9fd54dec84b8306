"""The inference engine: one model, one background thread, many concurrent requests, batched.

Scheduling is continuous batching (Orca's iteration-level scheduling, vLLM's KV block budget): each pass of the
engine loop admits waiting requests into free slots (FIFO, while KV blocks are free), then runs ONE step over every
running request: one decode token each, plus prefill chunks of requests still prefilling (at most
prefill_chunk_tokens of them per step, so a long prompt cannot stall the other streams for long). The step's model
execution sits behind runner.ModelRunner: a plain StepBatch (token ids, positions, block tables) in, logits out.
The KV cache is a budget of fixed-size blocks (kvcache.BlockPool); when a step needs a block and none is free,
the newest running request is preempted (vLLM's rule): its blocks are freed and it goes back to the front of the
queue, to be re-prefilled from its token ids later (recompute). docs/worker.md has the details.

One step, for prefill and decode alike: feed ids[num_cached:end] at positions num_cached..end-1; if that reached
the end of the known ids, sample the next token from the last position's logits. Resuming a generation from token
ids is therefore just a request whose known ids are prompt + already-generated tokens. Sampling is per request
(seeded per output index), and the paged runner's attention sees exactly a batch-of-one's keys and values, so a
request's tokens do not depend on what else runs.

Live migration (docs/migration.md) adds two request modes. HELD (destination): the request prefills its known ids
chunk-wise like any other but does not sample; `extend` appends tokens the source produced since (replayed through
the detokenizer and stop state as if generated here), and `attach` releases it: the next step samples from the
logits kept from the last prefilled position. PAUSED (source): the request is no longer scheduled, and a token
sampled concurrently is dropped under the lock, so `pause` reads the final token list atomically; the token is
not lost, because sampling is seeded per (seed, output index) and the destination draws the same one.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hpcllm.checkpoint.context import max_model_len_for
from hpcllm.errors import HpcllmError
from hpcllm.worker.detokenizer import IncrementalDetokenizer
from hpcllm.worker.kvcache import BlockPool
from hpcllm.worker.metrics import WorkerMetrics
from hpcllm.worker.protocol import (
    ErrorInfo,
    FinalLine,
    GenerateRequest,
    MigratedTo,
    RequestTokens,
    TokenLine,
    TokenLogprobs,
    TopLogprob,
    Usage,
)
from hpcllm.worker.runner import ModelRunner, PagedRunner, SequenceChunk, StepBatch, make_runner
from hpcllm.worker.sampling import SamplingParams, random_seed, sample_token

log = logging.getLogger(__name__)

Event = TokenLine | FinalLine

# The prefill rate (reported in /ready; the controller's migration-cost estimate) is measured on chunks this long
# or longer (shorter ones time the per-call overhead, not prefill), averaged with this weight for the newest chunk.
PREFILL_RATE_MIN_TOKENS = 16
PREFILL_RATE_WEIGHT = 0.3
DEFAULT_KV_BLOCK_SIZE = 16
BATCHING_MODES = ("auto", "paged", "sequential")

_seq_ids = itertools.count()  # runner-side identity of a request's KV state (request ids may be reused)


class EngineError(HpcllmError):
    """A request the engine refuses; http_status is what the worker's HTTP API answers."""

    http_status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=str(self), type=self.error_type, param=self.param, code=self.code)


class InvalidRequest(EngineError):
    http_status = 400
    error_type = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"


class DuplicateRequest(EngineError):
    http_status = 409
    error_type = "invalid_request_error"
    code = "duplicate_request_id"


class UnknownRequest(EngineError):
    http_status = 404
    error_type = "not_found_error"


class RequestConflict(EngineError):
    """The request exists but is in the wrong state for the call (not held, already migrating, finished...)."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "request_state_conflict"


class EngineOverloaded(EngineError):
    http_status = 503
    error_type = "overloaded_error"


class EngineUnavailable(EngineError):
    """The engine is not running (not started, shut down, or its thread died)."""

    http_status = 503
    error_type = "engine_unavailable"


@dataclass
class _Work:
    """One request's part of a step: feed all_ids[start:end]; if end == known, sample after it."""

    req: "_Request"
    start: int
    end: int
    known: int


@dataclass(eq=False)
class _EmbedJob:
    inputs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    embeddings: list[list[float]] | None = None
    error: BaseException | None = None


@dataclass
class Completion:
    """A whole generation collected from a stream (Engine.generate)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: str | int | None
    usage: Usage
    error: ErrorInfo | None = None


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    arrival: float
    events: queue.Queue = field(default_factory=queue.Queue)
    state: str = "waiting"
    all_ids: list[int] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_cached: int = 0  # ids whose keys/values are in the cache
    preemptions: int = 0
    cancel_requested: bool = False
    first_scheduled: float | None = None
    last_token_time: float | None = None
    resumed_tokens: int = 0
    finish_reason: str | None = None
    logprobs: int | None = None  # top alternatives per token line (None: no logprobs)
    origin: GenerateRequest | None = None  # as submitted: stop strings, stop ids, ignore_eos (to migrate it)
    # Live migration, destination side: prefilled but not sampling until attached; dropped at hold_deadline.
    held: bool = False
    hold_seconds: float = 0.0
    hold_deadline: float | None = None
    attached: bool = False
    # Live migration, source side.
    migrating: bool = False
    paused: bool = False
    # Logits of the last known id when it was prefilled but not sampled (held or paused): the next step samples.
    pending_logits: torch.Tensor | None = None

    @property
    def fully_cached(self) -> bool:
        return self.num_cached == len(self.all_ids)

    def has_work(self) -> bool:
        """Whether the engine thread must step this request now."""
        if self.cancel_requested:
            return True
        if self.paused:
            return False
        return not (self.held and self.fully_cached)

    def snapshot(self) -> RequestTokens:
        return RequestTokens(
            request_id=self.request_id,
            state="held" if self.held and self.state != "finished" else self.state,
            prompt_token_ids=list(self.prompt_ids),
            output_token_ids=list(self.output_ids),
            seed=self.params.seed,
            finish_reason=self.finish_reason,
        )

    def usage(self) -> Usage:
        prompt, completion = len(self.prompt_ids), len(self.output_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class RequestStream:
    """A submitted request's events. Closing it before the final event cancels the request."""

    def __init__(self, engine: "Engine", request: _Request) -> None:
        self._engine = engine
        self._request = request
        self.request_id = request.request_id
        self.finished = False

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self._request.prompt_ids)

    def events(self, keepalive_seconds: float | None = None) -> Iterator[Event | None]:
        """Token lines then one final line; yields None when keepalive_seconds pass without an event."""
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


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str = "model",
        max_model_len: int | None = None,
        max_running_requests: int = 8,
        max_waiting_requests: int = 256,
        prefill_chunk_tokens: int = 512,
        finished_history: int = 256,
        metrics: WorkerMetrics | None = None,
        kv_cache_tokens: int | None = None,
        kv_block_size: int = DEFAULT_KV_BLOCK_SIZE,
        batching: str = "auto",
        prefix_caching: bool = True,
    ) -> None:
        if max_running_requests < 1 or max_waiting_requests < 0 or prefill_chunk_tokens < 1:
            raise ValueError("max_running_requests and prefill_chunk_tokens must be >= 1, max_waiting >= 0")
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        if kv_block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, not {kv_block_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = model.get_input_embeddings().weight.device  # where input ids go, also under a device_map
        # The same rule as the controller's deploy check and the gateway's (hpcllm.checkpoint.context).
        self.max_model_len = max_model_len_for(model.config.to_dict(), max_model_len,
                                               tokenizer_max_length=getattr(tokenizer, "model_max_length", None))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.max_running_requests = max_running_requests
        self.max_waiting_requests = max_waiting_requests
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.metrics = metrics or WorkerMetrics(model_name)
        # KV budget: by default every slot can hold a full context (never preempts); set it lower to bound memory.
        self.kv_cache_tokens = kv_cache_tokens or max_running_requests * self.max_model_len
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"kv_cache_tokens {self.kv_cache_tokens} cannot hold one full context of max_model_len "
                f"{self.max_model_len} tokens; raise kv_cache_tokens or lower max_model_len"
            )
        num_blocks = -(-self.kv_cache_tokens // kv_block_size)
        self.runner: ModelRunner = make_runner(model, num_blocks=num_blocks, block_size=kv_block_size,
                                               batching=batching)
        # Shared prompt prefixes need shared KV blocks: the paged runner's (a DynamicCache per request cannot).
        self.kv_pool = BlockPool(num_blocks, kv_block_size,
                                 prefix_caching=prefix_caching and isinstance(self.runner, PagedRunner))
        self._to_free: list[int] = []  # seq ids whose KV the runner may forget at its next step
        self._embed_jobs: deque[_EmbedJob] = deque()  # run by the engine thread between steps
        self._finished_history = finished_history

        self._lock = threading.Condition(threading.RLock())
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._live: dict[str, _Request] = {}
        self._finished: OrderedDict[str, _Request] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self._prefill_rate: float | None = None  # tokens/s of prefill chunks, moving average (migration cost)

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name=f"hpcllm-engine-{self.model_name}", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ---- public API (any thread) -------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> RequestStream:
        """Validate, tokenize and queue a request. Raises an EngineError subclass for anything it refuses."""
        state = self._prepare(request)
        self._enqueue(state)
        return RequestStream(self, state)

    def _enqueue(self, state: _Request) -> None:
        request = state.origin
        with self._lock:
            if self._stopping or not self.alive:
                raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
            if request.request_id in self._live:
                raise DuplicateRequest(f"request id {request.request_id!r} is already in progress", "request_id")
            if len(self._waiting) >= self.max_waiting_requests and len(self._running) >= self.max_running_requests:
                raise EngineOverloaded(
                    f"worker is full ({len(self._running)} running, {len(self._waiting)} waiting); retry later"
                )
            self._finished.pop(request.request_id, None)
            self._live[request.request_id] = state
            self._waiting.append(state)
            self.metrics.num_requests_waiting.set(len(self._waiting))
            self._lock.notify_all()

    def generate(self, request: GenerateRequest) -> Completion:
        """Submit and wait for the whole generation (tests, benchmarks)."""
        stream = self.submit(request)
        token_ids: list[int] = []
        pieces: list[str] = []
        for event in stream.events():
            if isinstance(event, TokenLine):
                token_ids.append(event.token_id)
                pieces.append(event.text)
            else:
                return Completion(
                    request.request_id, token_ids, "".join(pieces), event.finish_reason, event.stop_reason,
                    event.usage, event.error,
                )
        raise RuntimeError("stream ended without a final line")

    def embed(self, inputs: list[list[int]], timeout: float = 600.0) -> list[list[float]]:
        """Embeddings of token id lists: the model's final hidden state at the last token, L2-normalized (vLLM's
        default pooling for decoder models). Runs on the engine thread between steps."""
        for i, ids in enumerate(inputs):
            self._check_token_ids(ids, f"input[{i}]")
            if len(ids) > self.max_model_len:
                raise PromptTooLong(f"input[{i}] has {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.max_model_len} tokens", "input")
        job = _EmbedJob(inputs)
        with self._lock:
            if self._stopping or not self.alive:
                raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
            self._embed_jobs.append(job)
            self._lock.notify_all()
        if not job.done.wait(timeout):
            raise EngineOverloaded(f"embedding did not finish within {timeout:g}s")
        if job.error is not None:
            raise EngineUnavailable(f"embedding failed: {job.error}")
        return job.embeddings

    def _run_embed_jobs(self) -> None:
        with self._lock:
            jobs, self._embed_jobs = list(self._embed_jobs), deque()
        for job in jobs:
            try:
                job.embeddings = [self._embed_one(ids) for ids in job.inputs]
            except torch.OutOfMemoryError as exc:
                job.error = exc
            finally:
                job.done.set()

    def _embed_one(self, ids: list[int]) -> list[float]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.arange(len(ids), device=self.device).unsqueeze(0)
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        last = hidden.last_hidden_state[0, -1].to(torch.float32)
        return torch.nn.functional.normalize(last, dim=-1).tolist()

    def tokens(self, request_id: str) -> RequestTokens:
        """Prompt and output token ids so far of a live or recently finished request (migration)."""
        with self._lock:
            return self._lookup(request_id).snapshot()

    def cancel(self, request_id: str, wait: bool = True, timeout: float = 60.0) -> RequestTokens:
        """Stop a request; with wait, return its token ids once the engine has stopped touching it."""
        with self._lock:
            req = self._lookup(request_id)
            if req.state == "waiting":
                self._finish(req, "abort")
            elif req.state == "running":
                req.cancel_requested = True
                self._lock.notify_all()
                if wait:
                    self._lock.wait_for(lambda: req.state == "finished", timeout)
            return req.snapshot()

    # ---- live migration, destination side (held requests) ------------------------------------------------------

    def hold(self, request: GenerateRequest, hold_seconds: float) -> None:
        """Queue a HELD request: prefill prompt + resume_token_ids, then wait (no sampling) to be attached."""
        state = self._prepare(request)
        state.held = True
        state.hold_seconds = hold_seconds
        state.hold_deadline = time.monotonic() + hold_seconds
        self._enqueue(state)

    def wait_prefilled(self, request_id: str) -> tuple[int, int]:
        """Block until a held request's known ids are all in its KV cache; (cached tokens, output tokens)."""
        with self._lock:
            req = self._held(request_id)
            # A held request that cannot be prefilled in time expires, which ends this wait too.
            self._lock.wait_for(lambda: req.state == "finished" or req.fully_cached or not req.held,
                                req.hold_seconds + 5.0)
            if req.state == "finished":
                raise RequestConflict(f"held request {request_id!r} was dropped before it was prefilled "
                                      f"({self._drop_reason(req)})", "request_id")
            return req.num_cached, len(req.output_ids)

    def extend(self, request_id: str, token_ids: list[int]) -> tuple[int, int]:
        """Append output tokens the source produced since the last round to a held request.

        They pass through the detokenizer and the stop checks exactly as if generated here. Tokens that would end
        the generation (a stop token or string, max_tokens, a full context) drop the held request: the source
        should have finished it instead of migrating it.
        """
        self._check_token_ids(token_ids, "token_ids")
        with self._lock:
            req = self._held(request_id)
            for position, token in enumerate(token_ids):
                req.detokenizer.add(token)
                req.output_ids.append(token)
                req.all_ids.append(token)
                ended = (
                    token in req.stop_token_ids
                    or req.detokenizer.stop_hit is not None
                    or len(req.output_ids) >= req.max_tokens
                    or len(req.all_ids) >= self.max_model_len
                )
                if ended:
                    self._finish(req, "abort")
                    raise InvalidRequest(
                        f"token_ids[{position}] ends the generation (stop or length): nothing left to migrate; "
                        "the held request is dropped", "token_ids",
                    )
            if token_ids:
                req.pending_logits = None  # they were for the old last position
            req.hold_deadline = time.monotonic() + req.hold_seconds
            self._lock.notify_all()
            return req.num_cached, len(req.output_ids)

    def attach(self, request_id: str, from_index: int) -> RequestStream:
        """Release a held request: it samples output index from_index next and streams from there."""
        with self._lock:
            req = self._held(request_id)
            if from_index != len(req.output_ids):
                raise RequestConflict(
                    f"attach from index {from_index}, but held request {request_id!r} has {len(req.output_ids)} "
                    "output tokens: the next token it generates has that index", "from_index",
                )
            req.held, req.hold_deadline, req.attached = False, None, True
            self._lock.notify_all()
        return RequestStream(self, req)

    def drop_held(self, request_id: str, timeout: float = 60.0) -> RequestTokens:
        """Cancel a held request (a migration that will not be attached); other requests are never touched."""
        with self._lock:
            self._held(request_id)
            return self.cancel(request_id, wait=True, timeout=timeout)

    def _held(self, request_id: str) -> _Request:
        req = self._lookup(request_id)
        if req.state == "finished":
            raise RequestConflict(f"request {request_id!r} is no longer held ({self._drop_reason(req)})", "request_id")
        if not req.held:
            raise RequestConflict(f"request {request_id!r} is not a held migration request", "request_id")
        return req

    @staticmethod
    def _drop_reason(req: _Request) -> str:
        if req.held and req.hold_deadline is not None and time.monotonic() >= req.hold_deadline:
            return f"not attached within hold_seconds={req.hold_seconds:g}"
        return f"finished: {req.finish_reason}"

    # ---- live migration, source side ---------------------------------------------------------------------------

    def migratable_request_ids(self) -> list[str]:
        """Requests a drain should move: running or waiting, not held here, not already leaving."""
        with self._lock:
            return [
                r.request_id for r in [*self._running, *self._waiting]
                if not (r.held or r.paused or r.migrating or r.cancel_requested)
            ]

    def begin_migration(self, request_id: str) -> GenerateRequest:
        """Mark a live request as migrating; the GenerateRequest that recreates it elsewhere (output so far as
        resume_token_ids, same seed and sampling). Only one migration of a request runs at a time."""
        with self._lock:
            req = self._lookup(request_id)
            if req.state == "finished":
                raise RequestConflict(f"request {request_id!r} already finished ({req.finish_reason})", "request_id")
            if req.held:
                raise RequestConflict(f"request {request_id!r} is a held migration request, not attached yet")
            if req.migrating or req.cancel_requested:
                raise RequestConflict(f"request {request_id!r} is already being migrated or cancelled")
            req.migrating = True
            origin = req.origin
            return GenerateRequest(
                request_id=req.request_id, prompt_token_ids=list(req.prompt_ids), max_tokens=req.max_tokens,
                temperature=req.params.temperature, top_p=req.params.top_p, top_k=req.params.top_k,
                seed=req.params.seed, stop=list(origin.stop), stop_token_ids=list(origin.stop_token_ids),
                ignore_eos=origin.ignore_eos, resume_token_ids=list(req.output_ids), logprobs=origin.logprobs,
            )

    def migration_output(self, request_id: str) -> list[int]:
        """Output so far of a migrating request; RequestConflict once it finished (it ended or was cancelled)."""
        with self._lock:
            req = self._migrating(request_id)
            return list(req.output_ids)

    def pause(self, request_id: str) -> list[int]:
        """Stop scheduling a migrating request and return its final output token list (atomically: a token
        sampled concurrently is dropped, and the destination samples the same one)."""
        with self._lock:
            req = self._migrating(request_id)
            req.paused = True
            return list(req.output_ids)

    def abandon_migration(self, request_id: str) -> None:
        """The migration failed: the request goes on here as if nothing happened (unpaused if it was paused)."""
        with self._lock:
            req = self._live.get(request_id)
            if req is not None and req.migrating:
                req.migrating = req.paused = False
                self._lock.notify_all()

    def finish_migrated(self, request_id: str, migrated_to: MigratedTo) -> None:
        """End a paused request's stream with finish_reason "migrated" and where it goes on."""
        with self._lock:
            req = self._migrating(request_id)
            if not req.paused:
                raise RuntimeError(f"request {request_id} must be paused before it is handed over")
            self._finish(req, "migrated", migrated_to=migrated_to)

    def _migrating(self, request_id: str) -> _Request:
        req = self._lookup(request_id)
        if req.state == "finished":
            raise RequestConflict(f"request {request_id!r} finished during the migration ({req.finish_reason})")
        if req.cancel_requested:
            raise RequestConflict(f"request {request_id!r} was cancelled during the migration")
        if not req.migrating:
            raise RequestConflict(f"request {request_id!r} is not being migrated")
        return req

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self._running), len(self._waiting)

    def tokens_in_flight(self) -> int:
        """Known token ids of the requests a drain would move: what a destination must prefill to take them."""
        with self._lock:
            return sum(len(r.all_ids) for r in [*self._running, *self._waiting]
                       if not (r.held or r.paused or r.migrating))

    @property
    def prefill_tokens_per_second(self) -> float | None:
        """Measured prefill rate (moving average over chunks of at least PREFILL_RATE_MIN_TOKENS); None before."""
        return self._prefill_rate

    def tokenize_prompt(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        with self._tokenizer_lock:
            if request.prompt is not None:
                return list(self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest(f"model {self.model_name} has no chat template; send a prompt", "messages")
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- request preparation (caller's thread) -----------------------------------------------------------------

    def _prepare(self, request: GenerateRequest) -> _Request:
        prompt_ids = self.tokenize_prompt(request)
        resumed = list(request.resume_token_ids)
        self._check_token_ids(prompt_ids, "prompt_token_ids")
        self._check_token_ids(resumed, "resume_token_ids")
        prompt_param = "messages" if request.messages is not None else "prompt"
        if len(prompt_ids) + len(resumed) >= self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens{f' plus {len(resumed)} resumed tokens' if resumed else ''}; "
                "shorten the prompt",
                prompt_param,
            )
        max_tokens = request.max_tokens or self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(prompt_ids)} prompt "
                f"tokens plus max_tokens={max_tokens} is {len(prompt_ids) + max_tokens}; lower max_tokens or "
                "shorten the prompt",
                "max_tokens",
            )
        if len(resumed) >= max_tokens:
            raise InvalidRequest(
                f"resume_token_ids already holds {len(resumed)} tokens, max_tokens is {max_tokens}: nothing to do",
                "resume_token_ids",
            )
        stop_token_ids = frozenset(request.stop_token_ids) | (
            frozenset() if request.ignore_eos else self.eos_token_ids
        )
        detokenizer = IncrementalDetokenizer(self.decode, request.stop)
        for position, token in enumerate(resumed):
            detokenizer.add(token)
            if token in stop_token_ids or detokenizer.stop_hit is not None:
                raise InvalidRequest(
                    f"resume_token_ids already end the generation (stop at index {position}): nothing to resume",
                    "resume_token_ids",
                )
        seed = request.seed if request.seed is not None else random_seed()
        params = SamplingParams(request.temperature, request.top_p, request.top_k, seed)
        return _Request(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            output_ids=resumed,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            detokenizer=detokenizer,
            arrival=time.monotonic(),
            all_ids=prompt_ids + resumed,
            resumed_tokens=len(resumed),
            origin=request,
            logprobs=request.logprobs,
        )

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{param} contains token id {bad}, outside this model's vocabulary 0..{self.vocab_size - 1}", param)

    def _lookup(self, request_id: str) -> _Request:
        req = self._live.get(request_id) or self._finished.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request {request_id!r} on this worker", "request_id")
        return req

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    active = self._next_round()
                    if active is None:
                        break
                    if self._embed_jobs:
                        self._run_embed_jobs()
                    if active:
                        self._step(active)
        except BaseException as exc:  # the engine is dead: fail everything, /health turns 503
            log.exception("engine loop died")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._end_all()

    def _next_round(self) -> list[_Request] | None:
        """Drop expired held requests, admit waiting ones into free slots, and return those with work to do;
        block while there is none (until a call or the next hold deadline); None when shutting down."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                next_deadline = self._expire_held(time.monotonic())
                self._admit()
                active = [req for req in self._running if req.has_work()]
                if active or self._embed_jobs:
                    return active
                self._lock.wait(None if next_deadline is None else max(0.0, next_deadline - time.monotonic()))

    def _admit(self) -> None:
        """FIFO admission into free slots while the KV budget holds the head request's known ids (plus the token
        it samples next). A request that does not fit waits, unless nothing runs (one full context always fits)."""
        while self._waiting and len(self._running) < self.max_running_requests:
            req = self._waiting[0]
            if req.cancel_requested:
                self._finish(req, "abort")
                continue
            shared = self.kv_pool.share_prefix(req.seq_id, req.all_ids) if req.num_cached == 0 else 0
            if not self.kv_pool.grow(req.seq_id, len(req.all_ids) + 1):
                self.kv_pool.free(req.seq_id)
                if self._running:
                    break
                raise RuntimeError(f"KV cache of {self.kv_pool.num_blocks} blocks cannot hold request {req.request_id}")
            if shared:
                req.num_cached = shared
                self.metrics.prefix_cache_hits.inc(shared)
            self.metrics.prefix_cache_queries.inc(len(req.all_ids))
            self._waiting.popleft()
            req.state = "running"
            self._running.append(req)
        self.metrics.num_requests_waiting.set(len(self._waiting))
        self.metrics.num_requests_running.set(len(self._running))

    def _expire_held(self, now: float) -> float | None:
        """Drop held requests past their deadline (freeing their KV cache); the earliest deadline left."""
        earliest = None
        for req in [*self._running, *self._waiting]:
            if not req.held or req.hold_deadline is None:
                continue
            if req.hold_deadline <= now:
                log.info("dropping held request %s: not attached within %gs", req.request_id, req.hold_seconds)
                self._finish(req, "abort")
            elif earliest is None or req.hold_deadline < earliest:
                earliest = req.hold_deadline
        return earliest

    # ---- one step: schedule, run, sample ---------------------------------------------------------------------------

    def _step(self, active: list[_Request]) -> None:
        for req in active:
            if req.cancel_requested:
                self._finish(req, "abort")
        with self._lock:
            work = self._schedule([r for r in active if r.state == "running" and r.has_work()])
            chunks = [w for w in work if w.end > w.start]
            batch = StepBatch(
                chunks=[SequenceChunk(w.req.seq_id, w.req.all_ids[w.start:w.end], w.start,
                                      self.kv_pool.table(w.req.seq_id), w.end == w.known) for w in chunks],
            )
            if chunks:
                batch.free, self._to_free = self._to_free, []
        if not work:
            return
        logits = None
        if chunks:
            began = time.perf_counter()
            try:
                logits = self._forward(batch)
            except torch.OutOfMemoryError as exc:
                self._out_of_memory([w.req for w in chunks], exc)
                return
            prefilled = sum(w.end - w.start for w in chunks if w.end - w.start > 1)
            if prefilled >= PREFILL_RATE_MIN_TOKENS:
                self._observe_prefill(sum(w.end - w.start for w in chunks), began)
        with self._lock:
            for w in chunks:
                self.kv_pool.register(w.req.seq_id, w.req.all_ids, w.end)
        row = 0
        for w in work:
            if w.end > w.start:
                w.req.num_cached = w.end
                if w.end < w.known:
                    continue  # mid-prefill: no logits for this one
                self._sample_and_commit(w.req, logits[row])
                row += 1
            else:
                self._sample_and_commit(w.req, w.req.pending_logits)

    def _schedule(self, candidates: list[_Request]) -> list["_Work"]:
        """Pick each request's chunk (decodes whole, prefills within prefill_chunk_tokens per step) and give it KV
        blocks, preempting the newest running requests when blocks run out. Called under the lock."""
        work: list[_Work] = []
        prefill_budget = self.prefill_chunk_tokens
        for req in candidates:
            if req.state != "running":  # preempted for an older request's blocks in this very loop
                continue
            if req.first_scheduled is None:
                req.first_scheduled = time.monotonic()
                self.metrics.request_queue_time.observe(req.first_scheduled - req.arrival)
                self.metrics.prompt_tokens.inc(len(req.prompt_ids))
            start, known = req.num_cached, len(req.all_ids)
            end = known
            if known - start > 1:  # prefill (a decode feeds the one token sampled last)
                end = start + min(known - start, prefill_budget)
                if end == start:
                    continue
                prefill_budget -= end - start
            if not self._make_room(req, end):
                continue  # req itself was preempted
            work.append(_Work(req, start, end, known))
        return work

    def _make_room(self, req: _Request, tokens: int) -> bool:
        """Grow req's blocks to `tokens`, preempting the newest running requests while none are free; False if
        req is the newest and got preempted itself."""
        while not self.kv_pool.grow(req.seq_id, tokens):
            victim = next((r for r in reversed(self._running) if self.kv_pool.holds(r.seq_id)), None)
            if victim is None:
                raise RuntimeError("KV cache exhausted with nothing to preempt")  # max_model_len fits: unreachable
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: _Request) -> None:
        """Free req's KV cache and queue it first: it is re-prefilled from its token ids (vLLM's recompute)."""
        log.info("preempting request %s (KV cache full): %d tokens to recompute", req.request_id, len(req.all_ids))
        self._release_kv(req)
        req.num_cached, req.pending_logits = 0, None
        req.preemptions += 1
        self._running.remove(req)
        req.state = "waiting"
        self._waiting.appendleft(req)
        self.metrics.preemptions.inc()

    def _release_kv(self, req: _Request) -> None:
        if self.kv_pool.holds(req.seq_id) or req.num_cached:
            self._to_free.append(req.seq_id)
        self.kv_pool.free(req.seq_id)

    def _out_of_memory(self, requests: list[_Request], exc: BaseException) -> None:
        """The device ran out of memory in a step: alone, the request fails; in a batch, the newest is preempted
        and the rest retried."""
        if len(requests) == 1:
            log.warning("request %s ran out of memory: %s", requests[0].request_id, exc)
            self._finish(requests[0], "error", error=ErrorInfo(message=f"out of memory: {exc}", type="server_error"))
            return
        with self._lock:
            newest = max(requests, key=self._running.index)
            self._preempt(newest)

    def _sample_and_commit(self, req: _Request, logits: torch.Tensor | None) -> None:
        if logits is None:
            raise RuntimeError(f"request {req.request_id}: nothing to sample from (no prefilled logits)")
        # Sample outside the lock; the commit below re-checks that the request may still take a token.
        token = None if (req.held or req.paused) else sample_token(logits, req.params, len(req.output_ids))
        logprobs = None if token is None or req.logprobs is None else self._logprobs(logits, token, req.logprobs)
        with self._lock:
            if req.state != "running":  # finished meanwhile (handed over, expired): keep nothing
                return
            if len(req.all_ids) > req.num_cached:  # extended meanwhile: prefill the new ids first
                req.pending_logits = None
                return
            if token is None or req.held or req.paused or req.cancel_requested:
                req.pending_logits = logits  # sample when attached / unpaused; the drawn token is redrawn then
                self._lock.notify_all()  # wait_prefilled
                return
            req.pending_logits = None
            self._accept(req, token, logprobs)

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        """The sampled token's log probability and the `top` most likely tokens' (raw model distribution)."""
        logprobs = torch.log_softmax(logits.detach().to("cpu", torch.float32), dim=-1)
        best = torch.topk(logprobs, top) if top else None
        ids = [token] + (best.indices.tolist() if best is not None else [])
        with self._tokenizer_lock:
            texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
        alternatives = [] if best is None else [
            TopLogprob(token_id=i, token=t, logprob=lp)
            for i, t, lp in zip(ids[1:], texts[1:], best.values.tolist())
        ]
        return TokenLogprobs(token=texts[0], logprob=float(logprobs[token]), top=alternatives)

    def _observe_prefill(self, tokens: int, began: float) -> None:
        if self.device.type == "cuda":  # the forward only queued the kernels
            torch.cuda.synchronize(self.device)
        rate = tokens / max(time.perf_counter() - began, 1e-6)
        previous = self._prefill_rate
        self._prefill_rate = rate if previous is None else previous + PREFILL_RATE_WEIGHT * (rate - previous)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        return self.runner.step(batch)

    def _accept(self, req: _Request, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a sampled token and emit its line (called under the lock, so pause sees all or nothing)."""
        now = time.monotonic()
        if req.last_token_time is None:
            if not req.attached:  # a migrated-in request's first token is not its time to first token
                self.metrics.time_to_first_token.observe(now - req.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        index = len(req.output_ids)
        req.output_ids.append(token)
        req.all_ids.append(token)
        self.metrics.generation_tokens.inc()

        finish_reason = stop_reason = None
        if token in req.stop_token_ids:
            text = req.detokenizer.flush()
            finish_reason = "stop"
            stop_reason = None if token in self.eos_token_ids else token
        else:
            text = req.detokenizer.add(token)
            if req.detokenizer.stop_hit is not None:
                finish_reason, stop_reason = "stop", req.detokenizer.stop_hit
            elif len(req.output_ids) >= req.max_tokens or len(req.all_ids) >= self.max_model_len:
                text += req.detokenizer.flush()
                finish_reason = "length"
        req.events.put(TokenLine(index=index, token_id=token, text=text, logprobs=logprobs))
        if finish_reason is not None:
            self._finish(req, finish_reason, stop_reason)

    def _finish(
        self, req: _Request, reason: str, stop_reason: str | int | None = None, error: ErrorInfo | None = None,
        migrated_to: MigratedTo | None = None,
    ) -> None:
        with self._lock:
            if req.state == "finished":
                return
            if req.state == "running":
                self._running.remove(req)
            elif req in self._waiting:
                self._waiting.remove(req)
            self._release_kv(req)
            req.state, req.finish_reason, req.pending_logits = "finished", reason, None
            self._live.pop(req.request_id, None)
            self._finished[req.request_id] = req
            while len(self._finished) > self._finished_history:
                self._finished.popitem(last=False)
            self.metrics.num_requests_running.set(len(self._running))
            self.metrics.num_requests_waiting.set(len(self._waiting))
            self._lock.notify_all()
        self.metrics.request_finished(reason)
        self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival)
        req.events.put(FinalLine(finish_reason=reason, stop_reason=stop_reason, usage=req.usage(), error=error,
                                 migrated_to=migrated_to))

    def _end_all(self) -> None:
        with self._lock:
            pending = list(self._running) + list(self._waiting)
            for job in self._embed_jobs:
                job.error = RuntimeError(self.error or "the engine shut down")
                job.done.set()
        for req in pending:
            if self.error is None:
                self._finish(req, "abort")
            else:
                info = ErrorInfo(message=f"engine failed: {self.error}", type="engine_unavailable")
                self._finish(req, "error", error=info)


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
