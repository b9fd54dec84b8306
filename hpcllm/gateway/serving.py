"""Logic shared by the completion endpoints: admit, route, generate on a worker, account.

A Generation is one client request with one or more prompts, each sampled n times (choice i*n + j is prompt i's
j-th sample, as vLLM numbers them). `start()` does everything that can still
become an HTTP error - the token-limit reservation, routing (which may wait for a cold start) and opening the
worker streams - so the endpoint answers 4xx/5xx with a proper status instead of a broken stream. `deltas()`
then yields text as the worker produces it; every choice's worker stream is opened at the start, so the worker
generates them together (one batch), and the gateway reads them as they come (several choices interleave in the
answer, as with OpenAI's and vLLM's servers). If a worker goes away mid-generation (it was
drained, preempted or died) the generation resumes on another instance from the tokens already received
(token-based migration: the worker's `resume_token_ids`), so the client sees one uninterrupted answer. A worker that
live-migrated the generation (docs/migration.md) ends its stream with finish_reason "migrated" and names the
destination: the gateway attaches there from the index it has delivered, falling back to resuming if that fails.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from flask import g, request

from hpcllm.config import ApiKey
from hpcllm.gateway.errors import (ApiError, ClientClosedRequest, InternalError, InvalidRequest,
                                   ServiceUnavailable, see_the_log)
from hpcllm.gateway.protocol import PromptLogprob, PromptLogprobs, SamplingOptions, UsageInfo
from hpcllm.gateway.routing import Endpoint, ModelCard
from hpcllm.gateway.runtime import Gateway, gateway_shutdown
from hpcllm.gateway.upstream import (WorkerBusy, WorkerLost, WorkerStream, WorkerUnavailable, open_attach,
                                     open_generation)
from hpcllm.gateway.usage import BATCH_ENDPOINT_PREFIX, usage_endpoint
from hpcllm.httpkit.streaming import ReadWait, wait_for_any
from hpcllm.worker.client import KEEPALIVE_PIECE, WorkerError
from hpcllm.worker.protocol import (FinalLine, GenerateRequest, MigratedTo, TokenLine, TokenLogprobs,
                                   engine_unavailable, offset_seed)

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often one choice may move to another instance after its worker went away mid-generation.
MAX_RESUMES = 2
# Attempts to open a generation when the routed worker refuses or is unreachable (routing again each time).
OPEN_ATTEMPTS = 3
# Live migrations one choice may follow (a request moved again and again would be a controller bug).
MAX_MIGRATIONS = 16


@dataclass
class RequestContext:
    request_id: str
    api_key: ApiKey | None
    arrived: float  # time.monotonic() when the request reached the gateway
    client: ClientConnection  # its connection, to notice a client that left (while it waits, as it is answered)
    created: int = field(default_factory=lambda: int(time.time()))
    endpoint: str = ""  # the API it came to (its blueprint: completions, chat, responses...), for usage accounting

    @classmethod
    def current(cls) -> RequestContext:
        return cls(request_id=g.request_id, api_key=g.get("api_key"), arrived=g.arrived,
                   endpoint=usage_endpoint(request.blueprint or "", request.environ),
                   client=ClientConnection.current())

    @property
    def batch(self) -> bool:
        """A batch's request (the batch runner's, through the app)."""
        return self.endpoint.startswith(BATCH_ENDPOINT_PREFIX)


@dataclass
class Choice:
    """One choice's generation: the instance it runs on, its current worker stream (a new one after a resume or a
    live migration), the token ids delivered so far and its latency bookkeeping."""

    index: int
    endpoint: Endpoint
    stream: WorkerStream | None = None
    output_ids: list[int] = field(default_factory=list)
    last_token_at: float | None = None  # across streams
    migration_pause_from: float | None = None  # set when attached; the next token ends the pause


@dataclass
class Delta:
    """New text for choice `index`; the last delta of a choice carries its finish_reason. With logprobs asked for,
    there is one delta per generated token (text may be empty) carrying that token's log probabilities."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None
    # With the choice's first token, when prompt log probabilities were asked for: one entry per prompt token.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # With finish_reason: the stop string (or stop token id) that ended the choice (vLLM's stop_reason).
    stop_reason: str | int | None = None


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def route_request(gw: Gateway, ctx: RequestContext, model: str) -> Endpoint:
    """A ready worker for the request's model (its key's group's own pools may serve it too), waiting up to
    route_timeout_seconds for one; the wait ends when the client leaves, or with the 503 gateway_shutdown once the
    gateway's drain timeout ran out (Gateway.stop_generations), or for a batch's request once the process closes
    (Gateway.stop_batch_generations)."""
    def abandoned() -> bool:
        gw.raise_if_stopping(ctx.batch)
        return ctx.client.gone()

    return gw.router.resolve(model, gw.config.gateway.route_timeout_seconds,
                             group=ctx.api_key.group if ctx.api_key else None, abandoned=abandoned)


def on_a_worker(gw: Gateway, ctx: RequestContext, endpoint: Endpoint, route: Callable[[], Endpoint],
                call: Callable[[Endpoint], T]) -> tuple[Endpoint, T]:
    """call(endpoint); while that worker refuses or cannot be reached (WorkerUnavailable: it died, drains, is full),
    forget it and try where route() sends the request now, OPEN_ATTEMPTS in all. The endpoint that answered, and
    its answer."""
    for attempt in range(1, OPEN_ATTEMPTS):
        try:
            return endpoint, call(endpoint)
        except WorkerUnavailable as exc:
            log.warning("request %s: %s; routing again", ctx.request_id, exc.message)
            gw.router.forget(endpoint, busy=isinstance(exc, WorkerBusy))
            time.sleep(0.5 * attempt)
            endpoint = route()
    return endpoint, call(endpoint)


def the_one_model(candidates: list[ModelCard], served: int, api: str) -> ModelCard:
    """The model a request naming none is for: the one candidate of the `served` models (those that answer `api`,
    what the error calls it), as vLLM (serving one) defaults it; else a 400 naming `model` that lists the candidates
    or says none answers."""
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(sorted(card.name for card in candidates))
    which = f"{len(candidates)} served models answer {api} ({names})" if candidates else \
        f"none of the {served} served models answers {api}"
    raise InvalidRequest(f"'model' is a required property: {which}; name one", param="model", code="missing_field")


def context_length_error(card: ModelCard, prompt_tokens: int, max_tokens: int | None, param: str,
                         max_tokens_param: str = "max_tokens") -> None:
    """400 when the prompt (plus the requested completion) cannot fit the model's context (OpenAI's wording); param
    names the prompt's field, max_tokens_param the field max_tokens came in (chat's max_completion_tokens)."""
    limit = card.max_model_len
    if limit is None:
        return
    if prompt_tokens >= limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_tokens} "
            f"tokens, which leaves no room for a completion. Please reduce the length of the prompt.",
            param=param, code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
            f"Please reduce the length of the prompt or {max_tokens_param}.", param=max_tokens_param,
            code="context_length_exceeded")


class Generation:
    def __init__(self, gw: Gateway, ctx: RequestContext, card: ModelCard, prompts: list[list[int]],
                 options: SamplingOptions, response_id: str, n: int = 1, kept_tokens: dict[int, str] | None = None):
        self.gw = gw
        self.ctx = ctx
        self.card = card
        self.model = card.name
        self.prompts = prompts
        self.n = n
        self.num_choices = len(prompts) * n
        self.options = options
        self.response_id = response_id
        # Special tokens whose text the answer keeps (a tool-call format's markers, Mistral's [TOOL_CALLS]): workers
        # decode skipping special tokens, as vLLM does unless a parser asks it to keep them.
        self.kept_tokens = kept_tokens or None
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.cumulative_logprobs = [0.0] * self.num_choices  # of each choice's tokens (best_of ranks by it)
        self._reserved = 0
        self._choices: list[Choice] = []  # all opened at the start
        self._interleaved = False  # several choices read on this thread as they come (non-blocking reads)
        self._first_token_seen = False
        # Seconds routing waited before a worker took the request (its tries at refusing workers included), observed
        # once when the first choice opens: a resume or a re-route later is the same request, not another queue wait.
        self._queued_seconds = 0.0
        self._closed = False
        self._close_lock = threading.Lock()
        self._aborted: str | None = None  # why the gateway stopped this generation (shutdown), if it did
        self._stream_slot: str | None = None  # the key's stream slot this generation holds (a streaming request)

    def output_ids(self, index: int) -> list[int]:
        """The token ids choice `index` has generated so far."""
        return self._choices[index].output_ids

    @property
    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=self.prompt_tokens + self.completion_tokens)

    def choice_usage(self, index: int) -> UsageInfo:
        """Choice `index`'s usage so far, its prompt's tokens and its own: a chunk's continuous usage stats (vLLM counts
        each chunk's choice alone)."""
        prompt, generated = len(self.prompts[index // self.n]), len(self._choices[index].output_ids)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

    # ------------------------------------------------------------------------------------------- admission
    def start(self, stream: bool = False) -> None:
        self.gw.track(self)
        try:
            self._check_priority()
            if stream:
                self._hold_stream_slot()
            self._reserve_tokens()
            endpoint = self._route()
            for index in range(self.num_choices):
                choice = Choice(index, endpoint)
                self._choices.append(choice)
                choice.stream = self._open(choice, resume_ids=[], attempt_tag=0)
                endpoint = choice.endpoint  # where it opened (routed again if that worker refused): the next go there
                if index == 0:  # a worker took them: counted (as usage counts them), a 503 while the model starts not
                    self.gw.metrics.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
                    self.gw.metrics.request_queue_time.labels(self.model).observe(self._queued_seconds)
        except BaseException:
            self.close()
            raise

    def _check_priority(self) -> None:
        """A request may yield to others (a larger priority) but not jump ahead of them: below its key's
        min_priority (without a key, its default: an open gateway's requests may only yield) is refused."""
        key = self.ctx.api_key
        floor = key.min_priority if key is not None else ApiKey.model_fields["min_priority"].default
        if self.options.priority < floor:
            raise InvalidRequest(f"priority {self.options.priority} is below {floor}, the most urgent this API key "
                                 f"may ask for; send a priority of {floor} or more (lower runs sooner)",
                                 param="priority", code="invalid_value")

    def _hold_stream_slot(self) -> None:
        key = self.ctx.api_key
        if key is None:
            return
        limit = key.max_concurrent_streams or self.gw.config.gateway.max_streams_per_key
        self.gw.limiter.open_stream(key, self.response_id, limit)
        self._stream_slot = self.response_id

    def _reserve_tokens(self) -> None:
        key = self.ctx.api_key
        if key is None:
            return
        # Without a known bound on the output, only the prompt is reserved; the output is charged when it ends.
        want = self.prompt_tokens + self.num_choices * (self.options.max_tokens or 0)
        self.gw.limiter.reserve_tokens(key, want)
        self._reserved = want

    def _route(self) -> Endpoint:
        metrics = self.gw.metrics
        waiting = metrics.num_requests_waiting.labels(self.model)
        waiting.inc()
        try:
            endpoint = route_request(self.gw, self.ctx, self.card.base_model)
        finally:
            waiting.dec()
        self._queued_seconds += endpoint.waited_seconds
        cold = endpoint.cold_start
        if cold is not None and self.gw.shared.first_sighting(cold.instance_id):
            metrics.cold_starts.labels(self.model, cold.tier).inc()
            if cold.load_seconds is not None:
                metrics.model_load_seconds.labels(cold.tier).observe(cold.load_seconds)
        return endpoint

    def _open(self, choice: Choice, resume_ids: list[int], attempt_tag: int) -> WorkerStream:
        """A worker stream for the choice on its endpoint (routing again, and moving the choice, when that worker
        refuses or is unreachable)."""
        opts = self.options
        index = choice.index
        sample = index % self.n
        # n samples of one prompt with one seed must still differ: sample j draws with seed + j.
        seed = None if opts.seed is None else offset_seed(opts.seed, sample)
        request = GenerateRequest(
            request_id=f"{self.response_id}-{index}-{attempt_tag}", prompt_token_ids=self.prompts[index // self.n],
            max_tokens=opts.max_tokens, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
            seed=seed, stop=opts.stop, stop_token_ids=opts.stop_token_ids, ignore_eos=opts.ignore_eos,
            resume_token_ids=resume_ids,
            logprobs=opts.logprobs, prompt_logprobs=opts.prompt_logprobs, min_p=opts.min_p,
            presence_penalty=opts.presence_penalty, frequency_penalty=opts.frequency_penalty,
            repetition_penalty=opts.repetition_penalty, logit_bias=opts.logit_bias, grammar=opts.grammar,
            thinking=opts.thinking, lora=self.card.lora, priority=opts.priority,
        )
        choice.endpoint, stream = on_a_worker(self.gw, self.ctx, choice.endpoint, self._route,
                                              lambda endpoint: self._open_on(endpoint, request))
        return stream

    def _open_on(self, endpoint: Endpoint, request: GenerateRequest) -> WorkerStream:
        return open_generation(self.gw.http, endpoint.worker_url, endpoint.key(self.gw.config.cluster.shared_secret),
                               request, self.gw.config.internal_http, for_request=self.ctx.request_id)

    # ------------------------------------------------------------------------------------------ generation
    def deltas(self) -> Iterator[Delta]:
        """The choices' text as it comes: one choice read blocking; several read together, without blocking,
        each delta as soon as its worker sent it."""
        try:
            self._raise_if_aborted()
            if len(self._choices) == 1:
                yield from self._run_choice(self._choices[0])
            else:
                yield from self._interleave()
        finally:
            self.close()

    def _interleave(self) -> Iterator[Delta]:
        self._interleaved = True
        running = {choice.index: self._run_choice(choice) for choice in self._choices}
        waits: dict[int, ReadWait] = {}
        ready = list(running)
        try:
            while running:
                for index in ready:
                    waits.pop(index, None)
                    for item in running[index]:
                        if item.__class__ is ReadWait:  # nothing more from this choice's worker yet
                            waits[index] = item
                            break
                        yield item
                    else:
                        del running[index]
                if running:
                    woken = wait_for_any(list(waits.values()))
                    ready = [index for index, wait in waits.items() if wait in woken]
        finally:
            for choice_run in running.values():  # one choice failed, or the client left: end the others now
                choice_run.close()

    def _run_choice(self, choice: Choice) -> Iterator[Delta | ReadWait]:
        index, output_ids = choice.index, choice.output_ids
        resumes = migrations = 0
        running = self.gw.metrics.num_requests_running.labels(self.model)
        running.inc()
        try:
            while True:
                try:
                    final = yield from self._read_stream(choice)
                except WorkerLost as exc:
                    self._raise_if_aborted()
                    final = None
                    reason = str(exc)
                else:
                    if final.finish_reason in ("stop", "length"):
                        self.gw.metrics.request_success.labels(self.model, final.finish_reason).inc()
                        yield Delta(index, "", final.finish_reason, stop_reason=final.stop_reason)
                        return
                    message = final.error.message if final.error else "unknown error"
                    if final.finish_reason == "error" and not _worker_died(final):
                        # The worker's message is its exception's text: for the log, not the client, who gets the id.
                        log.error("request %s choice %d: %s failed while generating: %s", self.ctx.request_id,
                                  index, choice.stream.where, message)
                        raise InternalError("the model's worker failed while generating; "
                                            + see_the_log(self.ctx.request_id), code="generation_failed")
                    if (final.finish_reason == "migrated" and final.migrated_to is not None
                            and migrations < MAX_MIGRATIONS):
                        migrations += 1
                        failure = self._attach(choice, final.migrated_to)
                        if failure is None:
                            continue
                        reason = failure
                    elif final.finish_reason == "error":
                        reason = f"{choice.stream.where} failed: {message}"
                    else:
                        reason = f"{choice.stream.where} ended the generation ({final.finish_reason})"
                if resumes >= MAX_RESUMES:  # the reason names internal addresses: the log has it, not the client
                    log.warning("request %s choice %d: %s; resumed %d times already, giving up",
                                self.ctx.request_id, index, reason, resumes)
                    raise ServiceUnavailable(f"generation interrupted: the model's worker was lost {resumes + 1} "
                                             f"times in a row", code="worker_lost", retry_after=2)
                resumes += 1
                self.gw.metrics.resumes.labels(self.model).inc()
                log.warning("request %s choice %d: %s; resuming elsewhere after %d tokens",
                            self.ctx.request_id, index, reason, len(output_ids))
                self.gw.router.forget(choice.endpoint)
                choice.endpoint = self._route()
                choice.stream = self._open(choice, resume_ids=list(output_ids), attempt_tag=resumes)
        finally:
            running.dec()

    def _attach(self, choice: Choice, moved: MigratedTo) -> str | None:
        """Follow a live migration: stream on from the destination. None on success, else why it failed."""
        delivered = len(choice.output_ids)
        if moved.from_index != delivered:  # the destination would refuse; resume from what the client has
            return (f"{choice.stream.where} migrated the generation from index {moved.from_index}, "
                    f"but {delivered} tokens were delivered")
        if not moved.grant:
            # The URL came from the source worker's stream, which a group's own pool controls: the gateway's
            # credentials never go there, only the grant of the controller's ticket (every real migration has one).
            return f"{choice.stream.where} migrated the generation without a migration grant"
        try:
            # The grant opens only this request, on the destination the controller named in the ticket.
            stream = open_attach(self.gw.http, moved.worker_url, moved.request_id, delivered, moved.grant,
                                 tls=self.gw.config.internal_http)
        except WorkerError as exc:
            return f"attaching to the migrated generation on {moved.worker_url} failed: {exc}"
        log.info("request %s choice %d: live-migrated to %s after %d tokens", self.ctx.request_id, choice.index,
                 moved.worker_url, delivered)
        choice.stream = stream
        choice.endpoint = choice.endpoint.migrated_to(moved.worker_url)
        self.gw.metrics.migrations.labels(self.model).inc()
        choice.migration_pause_from = choice.last_token_at or time.monotonic()
        return None

    def _read_stream(self, choice: Choice):
        """Yield deltas for the token lines of the choice's current stream (and, interleaving, a ReadWait whenever
        it has nothing more yet); return its FinalLine.

        Tokens that arrived together (the worker sent them in one write, having queued up while its stream thread
        waited for the CPU, or they piled up in this gateway's socket while its thread waited) become one delta,
        hence one SSE event, as vLLM's own server merges the tokens a slow reader has not taken yet; text is never
        held back waiting for a token that has not arrived. With logprobs every token keeps its own delta."""
        metrics = self.gw.metrics
        # This model's series, looked up once per stream rather than per token.
        inter_token_latency = metrics.inter_token_latency.labels(self.model)
        generation_tokens = metrics.generation_tokens.labels(self.model)
        last_token_at: float | None = None
        text = ""
        uncounted = 0  # tokens not in generation_tokens yet: added once per piece of the stream, not per token
        index, stream, output_ids = choice.index, choice.stream, choice.output_ids
        kept = self.kept_tokens
        if self._interleaved:
            stream.yield_when_idle()
        try:
            for item in stream:
                if item.__class__ is ReadWait:
                    self._raise_if_aborted()
                    yield item
                    continue
                if item is KEEPALIVE_PIECE:  # no token yet (queued on a full worker, a long prefill): still wanted?
                    self._raise_if_aborted()
                    if self.ctx.client.gone():
                        raise self.client_left()
                    continue
                if isinstance(item, FinalLine):
                    return item
                assert isinstance(item, TokenLine)
                now = time.monotonic()
                if not self._first_token_seen:
                    self._first_token_seen = True
                    metrics.time_to_first_token.labels(self.model).observe(now - self.ctx.arrived)
                elif last_token_at is not None:
                    inter_token_latency.observe(now - last_token_at)
                if choice.migration_pause_from is not None:
                    metrics.migration_pause.labels(self.model).observe(now - choice.migration_pause_from)
                    choice.migration_pause_from = None
                last_token_at = choice.last_token_at = now
                output_ids.append(item.token_id)
                self.completion_tokens += 1
                uncounted += 1
                last_of_piece = not stream.tokens_buffered
                if last_of_piece:
                    generation_tokens.inc(uncounted)
                    uncounted = 0
                piece = item.text if kept is None else kept.get(item.token_id, "") + item.text
                if item.logprobs is not None or item.prompt_logprobs is not None:
                    if item.logprobs is not None:
                        self.cumulative_logprobs[index] += item.logprobs.logprob
                    yield Delta(index, piece, logprobs=item.logprobs, prompt_logprobs=item.prompt_logprobs)
                else:
                    text += piece
                    if text and last_of_piece:
                        yield Delta(index, text)
                        text = ""
                self._raise_if_aborted()
            raise WorkerLost("the worker stream ended without a final line")
        finally:
            if uncounted:  # stopped within a piece (aborted, the client left)
                generation_tokens.inc(uncounted)

    def client_left(self) -> ClientClosedRequest:
        """The error of a generation whose client closed its connection (it is cancelled as it closes)."""
        return ClientClosedRequest(f"the client closed the connection after {self.completion_tokens} tokens; "
                                   f"generation cancelled")

    def abort(self, reason: str) -> None:
        """Called from another thread (gateway shutdown): the generation stops at its next token with `reason`."""
        self._aborted = reason

    def _raise_if_aborted(self) -> None:
        if self._aborted is not None:
            raise gateway_shutdown(self._aborted)

    def close(self) -> None:
        """Cancel the unfinished worker streams, give back unused reserved tokens, record the request's latency."""
        with self._close_lock:  # the request's thread, or the shutdown settling a stuck generation
            if self._closed:
                return
            self._closed = True
        self.gw.untrack(self)
        for choice in self._choices:
            if choice.stream is not None and not choice.stream.finished:
                choice.stream.cancel()
                self.gw.metrics.request_success.labels(self.model, "abort").inc()
        served = any(choice.stream is not None for choice in self._choices)
        if served:  # a worker took it: what it used counts; its latency too, as vLLM observes every finished
            # request (a failure before any token too)
            self.gw.usage.record(self.ctx.api_key, self.model, self.ctx.endpoint, self.prompt_tokens,
                                 self.completion_tokens)
            self.gw.metrics.e2e_request_latency.labels(self.model).observe(time.monotonic() - self.ctx.arrived)
        if self._stream_slot is not None:
            try:
                self.gw.limiter.close_stream(self._stream_slot)
            except Exception:
                log.exception("request %s: could not free its stream slot", self.ctx.request_id)
        if self.ctx.api_key is not None and self._reserved:
            try:
                # Refused before any worker took it (no instance, all busy): nothing was used, all comes back.
                used = self.prompt_tokens + self.completion_tokens if served else 0
                self.gw.limiter.settle_tokens(self.ctx.api_key, self._reserved, used)
            except Exception:  # never let bookkeeping hide the request's own outcome
                log.exception("request %s: could not settle its token reservation", self.ctx.request_id)


def _worker_died(final: FinalLine) -> bool:
    """The generation failed because its worker's engine died (its model process was killed, a step hung), not
    because of the request: another worker can continue it from the tokens delivered."""
    return engine_unavailable(final.error)


@dataclass
class ChoiceResult:
    """One whole choice: its text, why it ended, and per token (with logprobs asked for) its log probabilities
    and where its text starts in `text`."""

    index: int
    text: str = ""
    finish_reason: str = "stop"
    logprobs: list[tuple[TokenLogprobs, int]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when asked for: one entry per prompt token
    stop_reason: str | int | None = None  # the stop string (or stop token id) that ended it


class ClientConnection:
    """The socket of the request being served, to notice a client that hung up while its answer is generated."""

    def __init__(self, sock: socket.socket | None):
        self._sock = sock

    @classmethod
    def current(cls) -> ClientConnection:
        environ = request.environ  # gunicorn and werkzeug both hand the WSGI app its connection
        return cls(environ.get("gunicorn.socket") or environ.get("werkzeug.socket"))

    def gone(self) -> bool:
        """True once the client closed its connection. Asked at every delta, so a slot is freed within a step of the
        client leaving; a non-blocking peek costs a few microseconds against a token's tens."""
        if self._sock is None:
            return False
        timeout = self._sock.gettimeout()
        try:
            # A zero timeout, not only MSG_DONTWAIT: a gevent socket (gunicorn's gevent worker) would take the
            # EAGAIN as "wait until readable" and hold the request until the client sent something.
            self._sock.settimeout(0.0)
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""  # b"": the peer closed
        except (BlockingIOError, InterruptedError, ValueError):  # nothing to read (still there), or a TLS socket
            return False
        except OSError:  # reset by the peer
            return True
        finally:
            try:
                self._sock.settimeout(timeout)
            except OSError:  # closed meanwhile
                pass


def collect(generation: Generation) -> list[ChoiceResult]:
    """Run a generation to the end; every choice, in index order. A client that hangs up meanwhile cancels it (the
    worker frees its slots, the reservation is settled): nobody would read the answer."""
    connection = generation.ctx.client
    choices = [ChoiceResult(i) for i in range(generation.num_choices)]
    for delta in generation.deltas():
        choice = choices[delta.index]
        if delta.logprobs is not None:
            choice.logprobs.append((delta.logprobs, len(choice.text)))
        if delta.prompt_logprobs is not None:
            choice.prompt_logprobs = delta.prompt_logprobs
        choice.text += delta.text
        if delta.finish_reason:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        elif connection.gone():
            generation.close()
            raise generation.client_left()
    for choice in choices:
        choice.cumulative_logprob = generation.cumulative_logprobs[choice.index]
    return choices


def vllm_prompt_logprobs(ids: list[int], entries: list[TokenLogprobs | None] | None, top: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token after the first, the token's {logprob, rank, decoded_token} and its
    `top` most likely alternatives' (ranked 1..top), keyed by token id."""
    check_prompt_logprobs(ids, entries)
    shaped: PromptLogprobs = [None]
    for token_id, entry in zip(ids[1:], entries[1:]):
        ranked = {str(token_id): PromptLogprob(logprob=entry.logprob, rank=entry.rank, decoded_token=entry.token)}
        for rank, alternative in enumerate(entry.top[:top], start=1):
            ranked[str(alternative.token_id)] = PromptLogprob(logprob=alternative.logprob, rank=rank,
                                                              decoded_token=alternative.token)
        shaped.append(ranked)
    return shaped


def check_prompt_logprobs(ids: list[int], entries: list[TokenLogprobs | None] | None) -> None:
    if entries is None or len(entries) != len(ids):
        raise InternalError("the model's worker did not report the prompt's log probabilities",
                            code="generation_failed")


def sse(data) -> bytes:
    """One server-sent event exactly as OpenAI sends it: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else data.model_dump_json(exclude_unset=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def stream_error_event(exc: BaseException, request_id: str) -> bytes:
    """An error after the stream started can no longer change the status: send it as an event (as vLLM does)."""
    return f"data: {json.dumps(stream_error(exc, request_id).body())}\n\n".encode()


def stream_error(exc: BaseException, request_id: str) -> ApiError:
    """The error a stream reports: an API error as it is; anything else logged, and told as an internal error."""
    if not isinstance(exc, ApiError):
        log.exception("request %s failed while streaming", request_id, exc_info=exc)
        exc = InternalError("internal error while streaming; " + see_the_log(request_id))
    return exc

