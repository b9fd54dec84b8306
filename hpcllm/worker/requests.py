"""What hpcllm's two worker engines share: the per-request state, its event stream, and the engine-independent
half of the engine interface (hpcllm.worker.engine.Engine, batched on hpcllm's runner, and
hpcllm.worker.vllm_engine.VllmEngine, backed by vLLM).

Both engines validate and tokenize a request with the same rules and messages, turn each generated token into the
same token line with the same stop rules, finish requests the same way, and run live migration by tokens with
the same checks (docs/migration.md), and fail the same way when the model hangs (the step watchdog,
_watch_steps). What differs is how tokens are produced: EngineBase calls a few hooks (_release, _cached_tokens,
_resume, _suspend, _on_extended, _on_first_token, _stop_hung_model) that each engine implements.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from hpcllm.checkpoint.promptbound import longest_token_chars, min_tokens
from hpcllm.httpkit.errors import ServiceError
from hpcllm.worker.detokenizer import (IncrementalDetokenizer, decode_streams, leading_space_marker,
                                      prompt_context, text_decoder, with_leading_spaces)
from hpcllm.worker.protocol import (
    ENGINE_UNAVAILABLE,
    INVALID_MESSAGES,
    LOGPROB_FLOOR,
    ErrorInfo,
    FinalLine,
    GenerateRequest,
    MigratedTo,
    RequestTokens,
    TokenLine,
    TokenLogprobs,
    TopLogprob,
    Usage,
    chat_template_refusal,
)
from hpcllm.worker.grammar import GrammarState, InvalidGrammar, grammar_compiler
from hpcllm.worker.lora_config import AdapterConfig, AdapterError, check_adapter_names, read_adapter_config
from hpcllm.worker.sampling import SamplingParams, Thinking, ThinkingState, TokenState, answer_ids, random_seed

log = logging.getLogger(__name__)

Event = TokenLine | FinalLine


class EngineError(ServiceError):
    """A request the engine refuses; http_status is what the worker's HTTP API answers (hpcllm.httpkit.errors)."""

    http_status = 500
    error_type = "server_error"
    code: str | None = None

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

    @classmethod
    def of(cls, request_id: str) -> "DuplicateRequest":
        """The 409 for an id (a generation's, an embedding call's) already in progress on this worker."""
        return cls(f"request id {request_id!r} is already in progress", "request_id")


class UnknownRequest(EngineError):
    http_status = 404
    error_type = "not_found_error"


class RequestConflict(EngineError):
    """The request exists but is in the wrong state for the call (not held, already migrating, finished...)."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "request_state_conflict"


class UnknownAdapter(EngineError):
    """An unload names an adapter the worker does not serve (vLLM's answer: 404)."""

    http_status = 404
    error_type = "not_found_error"
    code = "lora_not_found"


class AdapterConflict(EngineError):
    """A load names an adapter served from another folder: the worker's state, not the request, is in the way
    (unload it first)."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "lora_already_loaded"


class LoraUnsupported(EngineError):
    """This worker cannot load that adapter at runtime, though another started with it could (its engine or
    options do not allow it): the controller replaces such an instance rather than give up the adapter."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "runtime_lora_unsupported"


class EngineOverloaded(EngineError):
    http_status = 503
    error_type = "overloaded_error"


class EngineUnavailable(EngineError):
    """The engine is not running (not started, shut down, or its thread died)."""

    http_status = 503
    error_type = ENGINE_UNAVAILABLE



@dataclass
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



@dataclass(eq=False, kw_only=True)
class RequestState:
    """One request's token ids, stop rules, event queue and migration state (each engine adds its own)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    arrival: float
    origin: GenerateRequest | None = None  # as submitted: stop strings, stop ids, ignore_eos (to migrate it)
    logprobs: int | None = None  # top alternatives per token line (None: no logprobs)
    # Prompt log probabilities (GenerateRequest.prompt_logprobs): top alternatives per prompt position, None when
    # not asked for or already delivered (a resumed request's first token line went out on an earlier worker).
    prompt_logprobs: int | None = None
    # What the first token line (index 0) carries: None for position 0, then one entry per prompt token as scored.
    prompt_logprobs_result: list[TokenLogprobs | None] | None = None
    # Written by the engine thread, read by the stream's HTTP thread; SimpleQueue: its put and get are C calls
    # (queue.Queue builds a Condition waiter per blocking get), once per stream per engine step.
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    state: str = "waiting"
    finish_reason: str | None = None
    last_token_time: float | None = None
    cancel_requested: bool = False  # a cancel waits for the engine thread (hpcllm's engine; vLLM's ends at once)
    # Live migration, destination side: prefilled but not generating until attached; dropped at hold_deadline.
    held: bool = False
    hold_seconds: float = 0.0
    hold_deadline: float | None = None
    drop_reason: str | None = None  # why the engine dropped it before its deadline (hpcllm's engine: a full KV cache)
    attached: bool = False
    # Live migration, source side.
    migrating: bool = False
    paused: bool = False
    # What a penalized, constrained or thinking request's choice reads of its tokens (hpcllm's engine, where the
    # worker samples its tokens; under asynchronous scheduling the model process keeps it): built from its ids when
    # it is first sampled, then updated per output token; None for every other request (they pay nothing per token).
    token_state: TokenState | None = None
    lora: str | None = None  # the LoRA adapter it runs with (GenerateRequest.lora); None: the base model
    lora_folder: str | None = None  # where that adapter was loaded from (EngineBase._bind_lora, as it is queued)
    # Which load of that folder's weights it runs with (EngineBase._adapter_loads; 0: held since start): a folder
    # rewritten and loaded again after an unload holds other weights under the same name and folder.
    lora_load: int = 0
    priority: int = 0  # GenerateRequest.priority: lower is sooner (admission, and which request is preempted)
    # (finish_reason, stop_reason) of a resume whose resume_token_ids already end it: answered without generating.
    resumed_end: tuple[str, str | int | None] | None = None

    @property
    def lora_key(self) -> tuple[str, str] | None:
        """Its adapter as the engine holds it: a name loaded again from another folder while requests still ran
        with the old one is another adapter, until they end."""
        return None if self.lora is None else (self.lora, self.lora_folder or "")

    @property
    def cache_salt(self) -> bytes:
        """What its KV blocks' prefix-cache keys start from: an adapter's keys/values are not the base model's, nor
        another folder's loaded under the same name since (vLLM keys blocks by adapter name and path too), nor the
        same folder's loaded again after an unload (its files may have been rewritten: a retrained adapter)."""
        if self.lora is None:
            return b""
        return b"lora\0" + self.lora.encode() + b"\0" + (self.lora_folder or "").encode() + b"\0%d" % self.lora_load

    @property
    def known_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def append_output(self, token: int) -> None:
        self.output_ids.append(token)
        if self.token_state is not None:
            self.token_state.add(token)

    @property
    def grammar(self) -> str | None:
        """A constrained request's grammar (GenerateRequest.grammar, grammar.py)."""
        return self.origin.grammar if self.origin is not None else None

    def state_for_sampling(self, vocab_size: int, grammar_tokenizer) -> TokenState | None:
        """What the penalties and the grammar read (None for a request without them)."""
        if self.params.reads_tokens and self.token_state is None:
            self.token_state = TokenState.build(self.params, vocab_size, self.prompt_ids, self.output_ids,
                                                self.grammar, grammar_tokenizer)
        return self.token_state

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

    def __init__(self, engine: "EngineBase", request: RequestState) -> None:
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

    def event_batches(self, keepalive_seconds: float | None = None) -> Iterator[list[Event]]:
        """Like events(), but everything already queued comes at once: a reader that fell behind the engine (its
        thread waited for the CPU or the GIL) catches up with one write instead of one per token. An empty list
        when keepalive_seconds pass without an event."""
        events = self._request.events
        while not self.finished:
            try:
                first = events.get(timeout=keepalive_seconds)
            except queue.Empty:
                yield []
                continue
            self.finished = isinstance(first, FinalLine)
            yield [first, *self.take_ready()]

    def take_ready(self) -> list[Event]:
        """Every event queued now, without waiting (the stream writer's read); marks the stream finished at its
        final line."""
        events, ready = self._request.events, []
        while not self.finished:
            try:
                ready.append(events.get_nowait())
            except queue.Empty:
                break
            self.finished = isinstance(ready[-1], FinalLine)
        return ready

    def close(self) -> None:
        if not self.finished and self._request.state != "finished":
            self._engine.cancel(self.request_id, wait=False)


KV_CACHE_FULL = "KV cache full"  # why a request was preempted, or a held one dropped (preempted_reason)


def preempted_reason(reason: str) -> str:
    """The drop reason of a held request the engine preempted (its prepare or extend answers 409 with it)."""
    return f"preempted on this worker: {reason}"


def max_requests(max_running_requests: int, max_waiting_requests: int) -> int:
    """The requests an engine holds at once, running or waiting: one more is refused (EngineBase._refuse_when_full),
    so these are also the generation streams a worker serves at once (its HTTP threads: WorkerService)."""
    return max_running_requests + max_waiting_requests


class EngineBase:
    """The engine interface's engine-independent methods, over the state each engine keeps: _lock (a Condition
    over an RLock), _tokenizer_lock, _live and _finished (request id -> RequestState), _outbox (a list),
    _finished_history, _thread, _stopping, error, _prefill_rate, metrics, tokenizer, model_name, vocab_size,
    max_model_len, max_running_requests and eos_token_ids. An engine implements _enqueue, cancel, counts, _loop (its
    thread's work) and the hooks below.
    """

    request_type: type[RequestState] = RequestState
    thread_name = "hpcllm-engine"
    # Called after events were handed to streams (maybe under the engine lock: it must not take it): the worker's
    # stream writer wakes (stream_writer.py).
    on_events_delivered: Callable[[], None] | None = None
    # Called once with the reason when the engine dies (self.error set; its requests have their final lines): a dead
    # engine never serves again, so the worker's process stops (server.serve) and its supervisor starts another.
    on_died: Callable[[str], None] | None = None
    _death_reported = False
    # Seconds the engine thread may wait for the model (a step, an embedding piece) before the engine counts as hung
    # and fails ([worker] step_timeout_seconds; None: never): _watch_steps.
    step_timeout: float | None = None
    _model_busy_since: float | None = None  # when the engine thread began waiting for the model
    # Whether a constrained request (grammar) can go on from output tokens produced before (resume_token_ids, a
    # held request, a migration abandoned after its pause): hpcllm's engine replays them through the grammar; vLLM
    # cannot (it would read them as prompt and start the grammar over), so there such a request finishes where it
    # began.
    continues_grammars = True
    # The LoRA adapters it serves (name -> folder); a request names one or none. Replaced, never changed in place.
    lora_adapters: dict[str, str] = {}
    # Adapters (name, folder) unloaded while requests still ran with them: their weights go when the last ends.
    _retiring_adapters: frozenset[tuple[str, str]] = frozenset()
    lora_refusal: str | None = None  # why this engine cannot load adapters at runtime; None: it can
    classifies: bool = False  # its model is a classifier (*ForSequenceClassification): embed pools its scores
    max_requests: int  # running and waiting requests at most (max_requests()), set by each engine

    def _refuse_when_full(self, held: int) -> None:
        """Refuse a new request (503, EngineOverloaded) while `held` requests run or wait (under the lock): bounded
        in total, not per queue, as the worker has an HTTP thread for max_requests streams only."""
        if held >= self.max_requests:
            raise EngineOverloaded(f"worker is full ({held} requests running or waiting, at most "
                                   f"{self.max_requests}); retry later")

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self):
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.thread_name}-{self.model_name}", daemon=True)
        self._thread.start()
        if self.step_timeout is not None:
            threading.Thread(target=self._watch_steps, name=f"hpcllm-step-watch-{self.model_name}",
                             daemon=True).start()
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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ---- public API (any thread) -------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> RequestStream:
        """Validate, tokenize and queue a request. Raises an EngineError subclass for anything it refuses."""
        req = self._prepare(request)
        if req.resumed_end is not None:  # nothing left to generate: only the final line, with how it ended
            reason, stop_reason = req.resumed_end
            req.state, req.finish_reason = "finished", reason
            self._count_finished(req, reason)
            req.events.put(FinalLine(finish_reason=reason, stop_reason=stop_reason, usage=req.usage()))
            return RequestStream(self, req)
        self._enqueue(req)
        return RequestStream(self, req)

    def generate(self, request: GenerateRequest) -> Completion:
        """Submit and wait for the whole generation (tests, benchmarks)."""
        token_ids: list[int] = []
        pieces: list[str] = []
        for event in self.submit(request).events():
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

    @property
    def prefill_tokens_per_second(self) -> float | None:
        """Measured prefill rate (moving average); None before the first measurement."""
        return self._prefill_rate

    def tokenize_prompt(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        self._check_prompt_chars(request)
        with self._tokenizer_lock:  # fast tokenizers are not safe to share across threads
            if request.prompt is not None:
                return list(self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest(f"model {self.model_name} has no chat template; send a prompt", "messages")
            text = self._render_chat([m.model_dump() for m in request.messages])
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render_chat(self, messages: list[dict]) -> str:
        """The chat template's text of the messages. A template that refuses them (its raise_exception: roles that
        do not alternate, say) refuses the request in its own words; one that does not parse stays the model's fault
        (a 500), as on the gateway (protocol.INVALID_MESSAGES)."""
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError:
            raise
        except TemplateError as exc:
            raise InvalidRequest(chat_template_refusal(exc), "messages", code=INVALID_MESSAGES) from None

    def _check_prompt_chars(self, request: GenerateRequest) -> None:
        """Refuse a text prompt too long for the context whatever its tokens, before tokenizing it: tokenizing
        megabytes takes seconds under the tokenizer lock, which the engine thread's detokenizing waits for (every
        stream would stall). The gateway's rule (hpcllm.checkpoint.promptbound), so both refuse the same prompts."""
        if request.prompt is not None:
            chars, param = len(request.prompt), "prompt"
        else:
            chars, param = sum(len(m.content) for m in request.messages), "messages"
        at_least = min_tokens(chars, self._longest_token_chars)
        if at_least >= self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has at least "
                f"{at_least} tokens ({chars} characters); shorten the prompt", param,
            )

    @functools.cached_property
    def _longest_token_chars(self) -> int:
        with self._tokenizer_lock:  # reads the vocabulary once
            return longest_token_chars(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self._decode_ids(ids)

    @functools.cached_property
    def _decode_ids(self) -> Callable[[list[int]], str]:
        return text_decoder(self.tokenizer)

    def _token_logprobs(self, tokens: list[int], logprobs: list[float], top_ids: list[list[int]],
                        top_logprobs: list[list[float]], ranks: list[int] | None = None) -> list[TokenLogprobs]:
        """Wire entries of tokens' log probabilities and their alternatives, every token decoded alone (one
        tokenizer call for all; a Metaspace tokenizer's word-leading space put back), -inf as LOGPROB_FLOOR."""
        ids = tokens + [i for row in top_ids for i in row]
        marker = self._space_marker
        with self._tokenizer_lock:
            texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
            if marker is not None:
                texts = [with_leading_spaces(piece or "", text, marker)
                         for piece, text in zip(self.tokenizer.convert_ids_to_tokens(ids), texts)]
        alternatives = iter(zip(ids[len(tokens):], texts[len(tokens):]))
        entries = []
        for position, (text, logprob, row_logprobs) in enumerate(zip(texts, logprobs, top_logprobs)):
            # The row's own list first: zip stops on it before taking one of the next row's alternatives.
            top = [TopLogprob(token_id=i, token=t, logprob=max(lp, LOGPROB_FLOOR))
                   for lp, (i, t) in zip(row_logprobs, alternatives)]
            entries.append(TokenLogprobs(token=text, logprob=max(logprob, LOGPROB_FLOOR), top=top,
                                         rank=ranks[position] if ranks is not None else None))
        return entries

    @functools.cached_property
    def _space_marker(self) -> str | None:
        with self._tokenizer_lock:  # reads the tokenizer's configuration once
            return leading_space_marker(self.tokenizer)

    def new_detokenizer(self, stop: list[str], prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        """A request's detokenizer: incremental in the Rust tokenizer where it can be (detokenizer.decode_streams),
        reading the prompt's last ids for context (detokenizer.prompt_context)."""
        context = prompt_context(self.decode, prompt_ids)
        new_stream = self._decode_streams
        return IncrementalDetokenizer(self.decode, stop, stream=new_stream(context) if new_stream is not None else None,
                                      context=context)

    @functools.cached_property
    def _decode_streams(self):
        return decode_streams(self.tokenizer, self._tokenizer_lock)

    # ---- live migration, destination side (held requests) ------------------------------------------------------

    def hold(self, request: GenerateRequest, hold_seconds: float) -> None:
        """Queue a HELD request: prefill prompt + resume_token_ids, then wait (no sampling) to be attached."""
        req = self._prepare(request)
        if req.resumed_end is not None:
            raise InvalidRequest(f"resume_token_ids already end the generation ({req.resumed_end[0]}): nothing to "
                                 "migrate", "resume_token_ids")
        if req.params.constrained and not self.continues_grammars:
            raise InvalidRequest("this worker's engine cannot continue a grammar-constrained request from "
                                 "another worker's output; it finishes where it runs", "grammar")
        req.held, req.hold_seconds = True, hold_seconds
        req.hold_deadline = time.monotonic() + hold_seconds
        self._enqueue(req)

    def wait_prefilled(self, request_id: str) -> tuple[int, int]:
        """Block until a held request's known ids are all prefilled; (prefilled tokens, output tokens)."""
        with self._lock:
            req = self._held(request_id)
            # A held request that cannot be prefilled in time expires, which ends this wait too.
            self._lock.wait_for(
                lambda: req.state == "finished" or self._cached_tokens(req) >= req.known_tokens or not req.held,
                req.hold_seconds + 5.0,
            )
            if req.state == "finished":
                raise RequestConflict(f"held request {request_id!r} was dropped before it was prefilled "
                                      f"({self._drop_reason(req)})", "request_id")
            return self._cached_tokens(req), len(req.output_ids)

    def extend(self, request_id: str, token_ids: list[int]) -> tuple[int, int]:
        """Append output tokens the source produced since the last round to a held request.

        They pass through the detokenizer and the stop checks exactly as if generated here. Tokens that would end
        the generation (a stop token or string, max_tokens, a full context) drop the held request: the source
        should have finished it instead of migrating it.
        """
        self._check_token_ids(token_ids, "token_ids")
        with self._lock:
            req = self._held(request_id)
            if req.params.constrained:
                self._check_grammar(req.grammar, req.params.thinking, req.output_ids, token_ids, "token_ids")
            for position, token in enumerate(token_ids):
                req.detokenizer.add(token)
                req.append_output(token)
                ended = (
                    token in req.stop_token_ids
                    or req.detokenizer.stop_hit is not None
                    or len(req.output_ids) >= req.max_tokens
                    or req.known_tokens >= self.max_model_len
                )
                if ended:
                    self._finish(req, "abort")
                    raise InvalidRequest(
                        f"token_ids[{position}] ends the generation (stop or length): nothing left to migrate; "
                        "the held request is dropped", "token_ids",
                    )
            if token_ids:
                self._on_extended(req)
            req.hold_deadline = time.monotonic() + req.hold_seconds
            self._lock.notify_all()
            return self._cached_tokens(req), len(req.output_ids)

    def attach(self, request_id: str, from_index: int) -> RequestStream:
        """Release a held request: it generates output index from_index next and streams from there."""
        with self._lock:
            req = self._held(request_id)
            if from_index != len(req.output_ids):
                raise RequestConflict(
                    f"attach from index {from_index}, but held request {request_id!r} has {len(req.output_ids)} "
                    "output tokens: the next token it generates has that index", "from_index",
                )
            req.held, req.hold_deadline, req.attached = False, None, True
            self._resume(req)
            self._lock.notify_all()
        return RequestStream(self, req)

    def drop_held(self, request_id: str, timeout: float = 60.0) -> RequestTokens:
        """Cancel a held request (a migration that will not be attached); other requests are never touched."""
        with self._lock:
            self._held(request_id)
            return self.cancel(request_id, wait=True, timeout=timeout)

    def _held(self, request_id: str) -> RequestState:
        req = self._lookup(request_id)
        if req.state == "finished":
            raise RequestConflict(f"request {request_id!r} is no longer held ({self._drop_reason(req)})", "request_id")
        if not req.held:
            raise RequestConflict(f"request {request_id!r} is not a held migration request", "request_id")
        return req

    @staticmethod
    def _drop_reason(req: RequestState) -> str:
        if req.drop_reason is not None:
            return req.drop_reason
        if req.held and req.hold_deadline is not None and time.monotonic() >= req.hold_deadline:
            return f"not attached within hold_seconds={req.hold_seconds:g}"
        return f"finished: {req.finish_reason}"

    def _expire_held(self, now: float) -> float | None:
        """Drop held requests past their deadline (under the lock); the earliest deadline left."""
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

    # ---- live migration, source side ---------------------------------------------------------------------------

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
            if req.params.constrained and not self.continues_grammars:
                raise RequestConflict(f"request {request_id!r} follows a grammar, which this engine cannot "
                                      "continue after a pause: it finishes here")
            req.migrating = True
            origin, params = req.origin, req.params
            return GenerateRequest(
                request_id=req.request_id, prompt_token_ids=list(req.prompt_ids), max_tokens=req.max_tokens,
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                min_p=params.min_p, presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                logit_bias=dict(params.logit_bias), stop=list(origin.stop),
                stop_token_ids=list(origin.stop_token_ids), ignore_eos=origin.ignore_eos,
                resume_token_ids=list(req.output_ids), logprobs=req.logprobs,
                prompt_logprobs=req.prompt_logprobs, grammar=origin.grammar, thinking=origin.thinking, lora=req.lora,
                priority=req.priority,
            )

    def migration_output(self, request_id: str) -> list[int]:
        """Output so far of a migrating request; RequestConflict once it finished (it ended or was cancelled)."""
        with self._lock:
            return list(self._migrating(request_id).output_ids)

    def pause(self, request_id: str) -> list[int]:
        """Stop generating a migrating request and return its final output token list (atomically: a token
        produced concurrently is dropped, and the destination produces it again)."""
        with self._lock:
            req = self._migrating(request_id)
            req.paused = True
            self._suspend(req)
            return list(req.output_ids)

    def abandon_migration(self, request_id: str) -> None:
        """The migration failed: the request goes on here as if nothing happened (unpaused if it was paused)."""
        with self._lock:
            req = self._live.get(request_id)
            if req is None or not req.migrating:
                return
            req.migrating = False
            if req.paused:
                req.paused = False
                self._resume(req)
            self._lock.notify_all()

    def finish_migrated(self, request_id: str, migrated_to: MigratedTo) -> None:
        """End a paused request's stream with finish_reason "migrated" and where it goes on."""
        with self._lock:
            req = self._migrating(request_id)
            if not req.paused:
                raise RuntimeError(f"request {request_id} must be paused before it is handed over")
            self._finish(req, "migrated", migrated_to=migrated_to)

    def ended(self, request_id: str) -> bool:
        """Whether a request ended here for good: it finished on its own, moved, or its client left (a cancel, done
        or under way: hpcllm's engine ends a running one at its next step), so a drain has nothing left of it to
        move. Not one the engine failed ("error") or this worker's shutdown aborted: the gateway resumes those from
        their tokens, and a drain reports them as not moved."""
        with self._lock:
            req = self._lookup(request_id)
            if req.cancel_requested or req.finish_reason in ("stop", "length", "migrated"):
                return True
            return req.finish_reason == "abort" and not self._stopping  # a cancel, not the shutdown's _end_all

    def _migrating(self, request_id: str) -> RequestState:
        req = self._lookup(request_id)
        if req.state == "finished":
            raise RequestConflict(f"request {request_id!r} finished during the migration ({req.finish_reason})")
        if req.cancel_requested:
            raise RequestConflict(f"request {request_id!r} was cancelled during the migration")
        if not req.migrating:
            raise RequestConflict(f"request {request_id!r} is not being migrated")
        return req

    # ---- request preparation (caller's thread) -----------------------------------------------------------------

    def _prepare(self, request: GenerateRequest) -> RequestState:
        prompt_ids = self.tokenize_prompt(request)
        resumed = list(request.resume_token_ids)
        self._check_token_ids(prompt_ids, "prompt_token_ids")
        self._check_token_ids(resumed, "resume_token_ids")
        self._check_token_ids(list(request.logit_bias), "logit_bias")
        self._check_token_ids(request.stop_token_ids, "stop_token_ids")
        prompt_param = "messages" if request.messages is not None else "prompt"
        if not prompt_ids:  # nothing to prefill: no logits to sample the first token from
            raise InvalidRequest(f"the {prompt_param} is empty once tokenized; give at least one token of text",
                                 prompt_param)
        known = len(prompt_ids) + len(resumed)
        # Resumed tokens filling the context exactly are a generation that ended ("length"), answered below.
        if known > self.max_model_len or (known == self.max_model_len and not resumed):
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
        if len(resumed) > max_tokens:
            raise InvalidRequest(
                f"resume_token_ids holds {len(resumed)} tokens, more than max_tokens ({max_tokens}) allows",
                "resume_token_ids",
            )
        stop_token_ids = frozenset(request.stop_token_ids) | (
            frozenset() if request.ignore_eos else self.eos_token_ids
        )
        thinking = self._thinking(request)
        if request.grammar is not None:
            self._validate_grammar(request.grammar)
            if resumed and not self.continues_grammars:
                raise InvalidRequest("this worker's engine cannot resume a grammar-constrained request from "
                                     "output tokens (it would start the grammar over)", "resume_token_ids")
            if resumed:
                self._check_grammar(request.grammar, thinking, [], resumed, "resume_token_ids")
            # A complete grammar allows only end-of-sequence, which ends the request (ignore_eos or not).
            stop_token_ids |= {self.grammar_tokenizer.eos_token}
        detokenizer = self.new_detokenizer(request.stop, prompt_ids)
        ended = self._resumed_end(resumed, max_tokens, stop_token_ids, detokenizer)
        self._check_lora(request.lora)
        seed = request.seed if request.seed is not None else random_seed()
        return self.request_type(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            output_ids=resumed,
            params=SamplingParams(request.temperature, request.top_p, request.top_k, seed, min_p=request.min_p,
                                  presence_penalty=request.presence_penalty,
                                  frequency_penalty=request.frequency_penalty,
                                  repetition_penalty=request.repetition_penalty,
                                  logit_bias=tuple(sorted(request.logit_bias.items())),
                                  constrained=request.grammar is not None, thinking=thinking),
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            detokenizer=detokenizer,
            arrival=time.monotonic(),
            origin=request,
            logprobs=request.logprobs,
            # Delivered with output index 0: a request resumed after it needs them no more.
            prompt_logprobs=None if resumed else request.prompt_logprobs,
            prompt_logprobs_result=None if resumed or request.prompt_logprobs is None else [None],
            lora=request.lora,
            priority=request.priority,
            resumed_end=ended,
        )

    def _resumed_end(self, resumed: list[int], max_tokens: int, stop_token_ids: frozenset[int],
                     detokenizer: IncrementalDetokenizer) -> tuple[str, str | int | None] | None:
        """(finish_reason, stop_reason) when resume_token_ids already end the generation, as _accept would have
        ended it at their last token (a worker lost between its last token line and its final line); None when
        there is more to generate. A stop before their last token: refused (they cannot be a generation's output)."""
        for position, token in enumerate(resumed):
            detokenizer.add(token)
            if token in stop_token_ids:
                stop_reason = None if token in self.eos_token_ids else token
            elif detokenizer.stop_hit is not None:
                stop_reason = detokenizer.stop_hit
            else:
                continue
            if position < len(resumed) - 1:
                raise InvalidRequest(
                    f"resume_token_ids end the generation at index {position} (a stop), but go on after it; "
                    "resume from the tokens up to the stop", "resume_token_ids",
                )
            return "stop", stop_reason
        return ("length", None) if resumed and len(resumed) >= max_tokens else None

    def _check_lora(self, name: str | None) -> None:
        """A request's adapter must be one this worker serves (a migration's destination too): checked when it is
        prepared and again when it is queued (under the lock), so an unload between the two cannot slip one in."""
        if name is not None and name not in self.lora_adapters:
            loaded = ", ".join(sorted(self.lora_adapters)) or "none"
            raise InvalidRequest(f"LoRA adapter {name!r} is not loaded on this worker of model {self.model_name} "
                                 f"(loaded: {loaded}); load it (POST /v1/load_lora_adapter), or name one of these",
                                 "lora")

    def _bind_lora(self, req: RequestState) -> None:
        """As a request is queued (under the lock): its adapter is still served, and from which folder."""
        self._check_lora(req.lora)
        if req.lora is not None:
            req.lora_folder = self.lora_adapters[req.lora]
            req.lora_load = self._adapter_loads.get(req.lora_key, 0)

    # ---- LoRA adapters at runtime (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter) -------------------

    def _init_lora(self, adapters: dict[str, str] | None) -> None:
        """The adapters it starts with (each engine's __init__)."""
        self.lora_adapters = dict(adapters or {})
        # Which load holds each (name, folder)'s weights now (RequestState.lora_load), from one engine-wide count
        # that never repeats: a folder loaded again after its weights went gets a number no cached block holds.
        # Absent (0): held since start. An entry goes with its weights (unload_lora, _retire_if_unused).
        self._loads = 0
        self._adapter_loads: dict[tuple[str, str], int] = {}
        self._lora_lock = threading.Lock()  # one load or unload at a time

    def load_lora(self, name: str, folder: str) -> bool:
        """Serve one more adapter, checked as at start (lora_config, then its weights where the forward runs);
        False when it is served from that folder already. InvalidRequest (param lora_name) for a name that cannot
        be an adapter's, AdapterError (a 400 naming lora_path) for a folder that cannot be served, AdapterConflict
        for another folder under a served name (unload it first); LoraUnsupported where this engine cannot load it
        at runtime. A name unloaded while requests still run with it may be loaded again at once, from another folder
        too (both are held until those requests end); from the same folder it is simply served again."""
        with self._lora_lock:
            try:
                check_adapter_names({name: folder})
            except AdapterError as exc:  # the name's fault, not the folder's
                raise InvalidRequest(str(exc), "lora_name") from None
            if name == self.model_name:
                raise InvalidRequest(f"LoRA adapter {name!r} has the base model's name; requests name either",
                                     "lora_name")
            with self._lock:
                current = self.lora_adapters.get(name)
                if current is None and (name, folder) in self._retiring_adapters:  # its weights are still there
                    self._retiring_adapters -= {(name, folder)}
                    self.lora_adapters = {**self.lora_adapters, name: folder}
                    return True
            if current == folder:
                return False
            if current is not None:
                raise AdapterConflict(f"LoRA adapter {name!r} is already loaded from {current}; unload it first to "
                                      f"load it from {folder}", "lora_name")
            if self.lora_refusal is not None:
                raise LoraUnsupported(self.lora_refusal, "lora_name")
            self._add_adapter(name, folder, read_adapter_config(name, folder))
            with self._lock:
                self.lora_adapters = {**self.lora_adapters, name: folder}
                self._loads += 1
                self._adapter_loads[name, folder] = self._loads
            log.info("LoRA adapter %s loaded from %s", name, folder)
            return True

    def unload_lora(self, name: str) -> int:
        """Stop serving an adapter: requests naming it are refused from now on (400 naming lora); its weights go
        once the requests running with it have ended (their streams go on). Returns how many still run with it."""
        with self._lora_lock:
            with self._lock:
                if name not in self.lora_adapters:
                    loaded = ", ".join(sorted(self.lora_adapters)) or "none"
                    raise UnknownAdapter(f"LoRA adapter {name!r} is not loaded on this worker (loaded: {loaded})",
                                         "lora_name")
                key = (name, self.lora_adapters[name])
                self.lora_adapters = {n: f for n, f in self.lora_adapters.items() if n != name}
                running = self._requests_with(key)
                if running:
                    self._retiring_adapters |= {key}
                else:
                    self._adapter_loads.pop(key, None)
            log.info("LoRA adapter %s unloaded%s", name, f" once its {running} requests end" if running else "")
            if not running:
                self._remove_adapter(*key, wait=True)
            return running

    def _requests_with(self, key: tuple[str, str]) -> int:
        return sum(req.lora_key == key for req in self._live.values())

    def _retire_if_unused(self, key: tuple[str, str] | None) -> None:
        """A request with this adapter finished (under the lock): the last of an unloaded adapter's frees it."""
        if key in self._retiring_adapters and not self._requests_with(key):
            self._retiring_adapters -= {key}
            self._adapter_loads.pop(key, None)
            self._remove_adapter(*key, wait=False)

    @functools.cached_property
    def grammar_tokenizer(self):
        """The tokenizer's grammar.grammar_compiler (llguidance's view of it, and the grammars compiled against it),
        for constrained requests."""
        with self._tokenizer_lock:
            return grammar_compiler(self.tokenizer)

    def _validate_grammar(self, grammar: str) -> None:
        """InvalidRequest unless the grammar compiles against the model's tokenizer (compiled once per grammar
        text: GrammarCompiler)."""
        try:
            compiler = self.grammar_tokenizer
        except ValueError as exc:  # llguidance reads fast (Rust) tokenizers only
            raise InvalidRequest(f"model {self.model_name}'s tokenizer cannot constrain output to a grammar: "
                                 f"{exc}", "grammar") from None
        try:
            compiler.check(grammar)
        except InvalidGrammar as exc:
            raise InvalidRequest(f"grammar cannot be compiled: {exc}", "grammar") from None

    def _thinking(self, request: GenerateRequest) -> Thinking | None:
        """The request's thinking rule, where it changes a choice (a grammar waits for its end, or a budget bounds
        it); its marker ids checked against the vocabulary."""
        thinking = request.thinking
        if thinking is None or (request.grammar is None and thinking.budget is None):
            return None
        self._check_token_ids([thinking.end_token_id], "thinking.end_token_id")
        if thinking.start_token_id is not None:
            self._check_token_ids([thinking.start_token_id], "thinking.start_token_id")
        return Thinking(thinking.end_token_id, thinking.start_token_id, thinking.budget)

    def _check_grammar(self, grammar: str, thinking: Thinking | None, output_ids: list[int], token_ids: list[int],
                       param: str) -> None:
        """InvalidRequest unless token_ids, after output_ids, follow the grammar (in the answer: a thinking
        request's thinking is free)."""
        known = output_ids + token_ids
        where = ThinkingState(thinking, known) if thinking is not None else None
        answer = answer_ids(where, known)
        first = len(known) - len(answer)  # output index of the answer's first token
        state = GrammarState(grammar, self.grammar_tokenizer, answer[:max(0, len(output_ids) - first)])
        refused = state.extend(answer[max(0, len(output_ids) - first):])
        if refused is not None:
            index = max(first, len(output_ids)) + refused - len(output_ids)
            raise InvalidRequest(f"{param}[{index}] does not follow the grammar: {state.error}", param)

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{param} contains token id {bad}, outside this model's vocabulary "
                                 f"0..{self.vocab_size - 1}", param)

    def _lookup(self, request_id: str) -> RequestState:
        req = self._live.get(request_id) or self._finished.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request {request_id!r} on this worker", "request_id")
        return req

    # ---- engine thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the engine is dead: fail everything, /health turns 503
            log.exception("%s loop died", self.thread_name)
            # The first reason stays: a hung step's (_fail_hung_step), not the kill that ended it.
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        finally:
            self._end_all()
            if self.error is not None:
                self._report_death()

    def _report_death(self) -> None:
        with self._lock:
            if self._death_reported:
                return
            self._death_reported = True
        if self.on_died is not None:
            self.on_died(self.error)

    def _loop(self) -> None:
        """Run requests until shutdown (the engine's own)."""
        raise NotImplementedError

    # ---- a hung step -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _model_busy(self):
        """Around the engine thread's waits for the model (a step's forward or result, an embedding piece)."""
        self._model_busy_since = time.monotonic()
        try:
            yield
        finally:
            self._model_busy_since = None

    def _watch_steps(self) -> None:
        """A step that never ends (a hung GPU or collective, a stopped model process or engine core) would hold its
        requests forever: their streams' keep-alives hide it from the gateway's read timeout and /health stays 200.
        Past step_timeout the engine fails instead: its requests end with an engine_unavailable error (the gateway
        resumes them elsewhere), /health turns 503 and the worker exits (its supervisor starts another)."""
        interval = min(1.0, self.step_timeout / 4)
        while self.alive and not self._stopping:
            since = self._model_busy_since
            if since is not None and time.monotonic() - since > self.step_timeout:
                self._fail_hung_step(time.monotonic() - since)
                return
            time.sleep(interval)

    def _fail_hung_step(self, seconds: float) -> None:
        self.error = (f"EngineHung: the model has not finished a step in {seconds:.1f} s (the step timeout is "
                      f"{self.step_timeout:g} s)")
        log.error("%s; failing the engine's requests", self.error)
        self._stop_hung_model()  # first: the engine thread may be blocked on the model holding the lock
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._end_all()  # an engine thread stuck in an in-process forward may never come back to do it
        self._report_death()

    # ---- tokens and finishing (engine thread, under the lock) --------------------------------------------------

    def _accept(self, req: RequestState, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a generated token and emit its line (under the lock, so pause sees all or nothing)."""
        now = time.monotonic()
        if req.last_token_time is None:
            if not req.attached:  # a migrated-in request's first token is not its time to first token
                self.metrics.time_to_first_token.observe(now - req.arrival)
                self._on_first_token(req)
        else:
            self.metrics.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        index = len(req.output_ids)
        req.append_output(token)
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
            elif len(req.output_ids) >= req.max_tokens or req.known_tokens >= self.max_model_len:
                text += req.detokenizer.flush()
                finish_reason = "length"
        # One per token per request on the engine thread: the validating constructor (pydantic-core, ~3 us) is
        # faster than model_construct (Python, ~7-9 us).
        self._emit(req, TokenLine(index=index, token_id=token, text=text, logprobs=logprobs,
                                  prompt_logprobs=req.prompt_logprobs_result if index == 0 else None))
        if finish_reason is not None:
            self._finish(req, finish_reason, stop_reason)

    def _finish(
        self, req: RequestState, reason: str, stop_reason: str | int | None = None, error: ErrorInfo | None = None,
        migrated_to: MigratedTo | None = None,
    ) -> None:
        with self._lock:
            if req.state == "finished":
                return
            self._release(req)
            req.state, req.finish_reason = "finished", reason
            self._live.pop(req.request_id, None)
            self._retire_if_unused(req.lora_key)
            self._finished[req.request_id] = req
            while len(self._finished) > self._finished_history:
                self._finished.popitem(last=False)
            running, waiting = self.counts()
            self.metrics.num_requests_running.set(running)
            self.metrics.num_requests_waiting.set(waiting)
            self._lock.notify_all()
        self._count_finished(req, reason)
        self._emit(req, FinalLine(finish_reason=reason, stop_reason=stop_reason, usage=req.usage(), error=error,
                                  migrated_to=migrated_to))

    def _count_finished(self, req: RequestState, reason: str) -> None:
        """req ended (reason, its finish_reason): how, and its time since arrival, go into the metrics."""
        self.metrics.request_finished(reason)
        self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival)

    def _emit(self, req: RequestState, event: Event) -> None:
        """Events of the engine thread wait in the outbox (_outbox, a list each engine creates) for the step's one
        hand-over, _deliver_events: the engine calls it when the step's bookkeeping is done, before it waits for the
        next step, so the stream threads wake while the model computes. Each put wakes a stream thread, which then
        wants the GIL the engine thread holds; woken in the middle of the bookkeeping they preempt it a token at a
        time. Any other thread's events (a cancel, a migration's hand-over) go out at once, after what the outbox
        holds (a stream's order stays)."""
        with self._lock:
            self._outbox.append((req.events, event))
            if threading.current_thread() is self._thread:
                return
        self._deliver_events()

    def _deliver_events(self) -> None:
        with self._lock:
            outbox, self._outbox = self._outbox, []
            for events, event in outbox:
                events.put(event)
        if outbox:
            self._events_delivered()

    def _events_delivered(self) -> None:
        if self.on_events_delivered is not None:
            self.on_events_delivered()

    def _end_all(self) -> None:
        """The loop ended: abort what is left, or fail it with the engine's error."""
        with self._lock:
            pending = list(self._live.values())
        for req in pending:
            if self.error is None:
                self._finish(req, "abort")
            else:
                info = ErrorInfo(message=f"engine failed: {self.error}", type=ENGINE_UNAVAILABLE)
                self._finish(req, "error", error=info)
        self._deliver_events()

    # ---- what each engine does its own way ---------------------------------------------------------------------

    def _release(self, req: RequestState) -> None:
        """req finishes: stop producing its tokens and free what it holds (under the lock)."""

    def _add_adapter(self, name: str, folder: str, config: AdapterConfig) -> None:
        """Install an adapter where the forward runs, returning once it is (never during a step). config: its
        adapter config, read (and checked) by load_lora."""
        raise LoraUnsupported(self.lora_refusal or "this engine cannot load LoRA adapters at runtime", "lora_name")

    def _remove_adapter(self, name: str, folder: str, wait: bool) -> None:
        """Free an adapter no request runs with any more (never during a step); wait=False: maybe under the lock,
        from any thread, so only queued (a later load of the name runs after it)."""

    def _cached_tokens(self, req: RequestState) -> int:
        """How many of a held request's known ids are prefilled."""
        raise NotImplementedError

    def _resume(self, req: RequestState) -> None:
        """req (attached, or unpaused after a failed migration) generates again (under the lock)."""

    def _suspend(self, req: RequestState) -> None:
        """req was paused for a migration: stop generating it (under the lock)."""

    def _on_extended(self, req: RequestState) -> None:
        """A held request got more known ids (under the lock)."""

    def _on_first_token(self, req: RequestState) -> None:
        """req produced its first token (not a migrated-in one's)."""

    def _stop_hung_model(self) -> None:
        """The model hung (_fail_hung_step): wake the engine thread from its wait for it, where the engine can."""
