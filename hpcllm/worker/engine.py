"""The inference engine: one model, one background thread, many concurrent requests.

Scheduling is iteration-level round robin over per-request KV caches (Orca-style scheduling without batching):
each pass of the engine loop admits waiting requests into free slots (FIFO), then advances every running request
by one step - a prefill chunk or one decode token - in arrival order. A long prompt is prefilled in chunks so it
cannot stall the other streams for long. Each request keeps its own transformers DynamicCache, so its numbers are
exactly those of a batch-of-one run (greedy output equals model.generate), and a request's state is just its token
ids, which is what live migration ships. docs/worker.md explains why this over padded continuous batching.

One step, for prefill and decode alike: feed ids[num_cached:end] at positions num_cached..end-1 with the cache; if
that reached the end of the known ids, sample the next token from the last position's logits. Resuming a
generation from token ids is therefore just a request whose known ids are prompt + already-generated tokens.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from hpcllm.errors import HpcllmError
from hpcllm.worker.detokenizer import IncrementalDetokenizer
from hpcllm.worker.metrics import WorkerMetrics
from hpcllm.worker.protocol import ErrorInfo, FinalLine, GenerateRequest, RequestTokens, TokenLine, Usage
from hpcllm.worker.sampling import SamplingParams, random_seed, sample_token

log = logging.getLogger(__name__)

Event = TokenLine | FinalLine


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


class EngineOverloaded(EngineError):
    http_status = 503
    error_type = "overloaded_error"


class EngineUnavailable(EngineError):
    """The engine is not running (not started, shut down, or its thread died)."""

    http_status = 503
    error_type = "engine_unavailable"


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
    cache: object | None = None
    num_cached: int = 0  # ids whose keys/values are in the cache
    cancel_requested: bool = False
    first_scheduled: float | None = None
    last_token_time: float | None = None
    resumed_tokens: int = 0
    finish_reason: str | None = None

    def snapshot(self) -> RequestTokens:
        return RequestTokens(
            request_id=self.request_id,
            state=self.state,
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
    ) -> None:
        if max_running_requests < 1 or max_waiting_requests < 0 or prefill_chunk_tokens < 1:
            raise ValueError("max_running_requests and prefill_chunk_tokens must be >= 1, max_waiting >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = model.get_input_embeddings().weight.device  # where input ids go, also under a device_map
        self.max_model_len = _context_length(model.config, max_model_len)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.max_running_requests = max_running_requests
        self.max_waiting_requests = max_waiting_requests
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.metrics = metrics or WorkerMetrics(model_name)
        self._forward_kwargs = _forward_kwargs(model)
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
        return RequestStream(self, state)

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

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self._running), len(self._waiting)

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
                    batch = self._next_round()
                    if batch is None:
                        break
                    for req in batch:
                        self._advance(req)
        except BaseException as exc:  # the engine is dead: fail everything, /health turns 503
            log.exception("engine loop died")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._end_all()

    def _next_round(self) -> list[_Request] | None:
        """Admit waiting requests into free slots; block while idle; None when shutting down."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                while self._waiting and len(self._running) < self.max_running_requests:
                    req = self._waiting.popleft()
                    req.state = "running"
                    self._running.append(req)
                self.metrics.num_requests_waiting.set(len(self._waiting))
                self.metrics.num_requests_running.set(len(self._running))
                if self._running:
                    return list(self._running)
                self._lock.wait()

    def _advance(self, req: _Request) -> None:
        if req.state != "running":
            return
        if req.cancel_requested:
            self._finish(req, "abort")
            return
        try:
            self._step(req)
        except torch.OutOfMemoryError as exc:  # this request does not fit; the others may
            log.warning("request %s ran out of memory: %s", req.request_id, exc)
            self._finish(req, "error", error=ErrorInfo(message=f"out of memory: {exc}", type="server_error"))

    def _step(self, req: _Request) -> None:
        if req.first_scheduled is None:
            req.first_scheduled = time.monotonic()
            self.metrics.request_queue_time.observe(req.first_scheduled - req.arrival)
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        start = req.num_cached
        end = min(len(req.all_ids), start + self.prefill_chunk_tokens)
        logits = self._forward(req, req.all_ids[start:end], start)
        req.num_cached = end
        if end == len(req.all_ids):
            self._accept(req, sample_token(logits, req.params, len(req.output_ids)))

    def _forward(self, req: _Request, chunk: list[int], start: int) -> torch.Tensor:
        if req.cache is None:
            req.cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        position_ids = torch.arange(start, start + len(chunk), dtype=torch.long, device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=True, **self._forward_kwargs(req.cache)
        )
        return out.logits[0, -1]

    def _accept(self, req: _Request, token: int) -> None:
        now = time.monotonic()
        if req.last_token_time is None:
            self.metrics.time_to_first_token.observe(now - req.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        index = len(req.output_ids)
        with self._lock:
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
        req.events.put(TokenLine(index=index, token_id=token, text=text))
        if finish_reason is not None:
            self._finish(req, finish_reason, stop_reason)

    def _finish(
        self, req: _Request, reason: str, stop_reason: str | int | None = None, error: ErrorInfo | None = None
    ) -> None:
        with self._lock:
            if req.state == "finished":
                return
            if req.state == "running":
                self._running.remove(req)
            elif req in self._waiting:
                self._waiting.remove(req)
            req.state, req.finish_reason, req.cache = "finished", reason, None
            self._live.pop(req.request_id, None)
            self._finished[req.request_id] = req
            while len(self._finished) > self._finished_history:
                self._finished.popitem(last=False)
            self.metrics.num_requests_running.set(len(self._running))
            self.metrics.num_requests_waiting.set(len(self._waiting))
            self._lock.notify_all()
        self.metrics.request_finished(reason)
        self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival)
        req.events.put(FinalLine(finish_reason=reason, stop_reason=stop_reason, usage=req.usage(), error=error))

    def _end_all(self) -> None:
        with self._lock:
            pending = list(self._running) + list(self._waiting)
        for req in pending:
            if self.error is None:
                self._finish(req, "abort")
            else:
                info = ErrorInfo(message=f"engine failed: {self.error}", type="engine_unavailable")
                self._finish(req, "error", error=info)


def _context_length(config, override: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None and override is None:
        raise ValueError("the model config has no max_position_embeddings; give max_model_len")
    if override is not None and limit is not None and override > limit:
        raise ValueError(f"max_model_len {override} exceeds the model's max_position_embeddings {limit}")
    return override if override is not None else int(limit)


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _forward_kwargs(model):
    """How this transformers version takes the cache (`cache`, formerly `past_key_values`), plus logits_to_keep."""
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return lambda cache: {cache_arg: cache, **extra}
