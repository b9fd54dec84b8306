"""The inference engine: one model, one background thread, many concurrent requests, batched.

Scheduling is continuous batching (Orca's iteration-level scheduling, vLLM's KV block budget): each pass of the
engine loop admits waiting requests into free slots (by priority, then FIFO, while KV blocks are free), then runs
ONE step over every running request: one decode token each, plus prefill chunks of requests still prefilling (at
most prefill_chunk_tokens of them per step, so a long prompt cannot stall the other streams for long). The step's
model execution sits behind runner.ModelRunner: a plain StepBatch (token ids, positions, block tables) in, logits
out.
The KV cache is a budget of fixed-size blocks (kvcache.BlockPool); when a step needs a block and none is free,
the lowest-priority, newest running request is preempted (vLLM's rule): its blocks are freed and it goes back to
the front of its priority's queue, to be re-prefilled from its token ids later (recompute; a held migration request
is dropped instead, docs/migration.md). A waiting request that finds no free slot or blocks preempts a running
request of a lower priority (a larger GenerateRequest.priority), at a step boundary. Equal priorities (the default:
all 0) are plain FIFO. docs/worker.md has the details.

One step, for prefill and decode alike: feed ids[num_cached:end] at positions num_cached..end-1; if that reached
the end of the known ids, sample the next token from the last position's logits. Resuming a generation from token
ids is therefore just a request whose known ids are prompt + already-generated tokens. Sampling is per request
(seeded per output index), and the paged runner's attention sees exactly a batch-of-one's keys and values, so a
request's tokens do not depend on what else runs.

Speculative decoding (speculative_ngram_tokens, ngram.py): a decode may also feed ids proposed by n-gram lookup in
its own ids; the step returns every fed position's logits and the commit keeps the proposal's prefix that decoding
one by one confirms (each position's token chosen as it would be there: the argmax, or drawn with the seed of its
output index) plus one token (_speculate, _commit_speculative). Each request's acceptance decides how much it
proposes, and whether (ngram.SpeculationRecord).

Live migration (docs/migration.md) adds two request modes. HELD (destination): the request prefills its known ids
chunk-wise like any other but does not sample; `extend` appends tokens the source produced since (replayed through
the detokenizer and stop state as if generated here), and `attach` releases it: the next step samples from the
logits kept from the last prefilled position. PAUSED (source): the request is no longer scheduled, and a token
sampled concurrently is dropped under the lock, so `pause` reads the final token list atomically; the token is
not lost, because sampling is seeded per (seed, output index) and the destination draws the same one.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpcllm.checkpoint.context import max_model_len_for
from hpcllm.worker import fastpath
from hpcllm.worker.kvcache import BlockPool
from hpcllm.worker.lora_config import AdapterConfig, AdapterError
from hpcllm.worker.metrics import WorkerMetrics
from hpcllm.worker.protocol import ErrorInfo, GenerateRequest, RequestTokens, TokenLogprobs
from hpcllm.worker.requests import (  # noqa: F401  (the errors, Completion and RequestStream are this API's too)
    Completion,
    DuplicateRequest,
    EngineBase,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    Event,
    InvalidRequest,
    KV_CACHE_FULL,
    PromptTooLong,
    RequestConflict,
    RequestState,
    RequestStream,
    UnknownRequest,
    max_requests,
    preempted_reason,
)
from hpcllm.worker.graphs import DecodeGraphs
from hpcllm.worker.runner import (LORA_NEEDS_PAGED, ModelRunner, PagedRunner, PositionScores, SequenceChunk,
                                  StateSeed, StepBatch, classifier_head, full_attention_only, make_runner,
                                  pool_last_tokens)
from hpcllm.worker.model_process import ModelProcess
from hpcllm.worker.ngram import NgramProposer, SpeculationRecord
from hpcllm.worker.runner_process import ProcessRunner, StepSkipped
from hpcllm.worker.sampling import ThinkingState, TokenState, forced_or, sample_token, verify_proposal

log = logging.getLogger(__name__)

# The prefill rate (reported in /ready; the controller's migration-cost estimate) is measured on chunks this long
# or longer (shorter ones time the per-call overhead, not prefill), averaged with this weight for the newest chunk.
PREFILL_RATE_MIN_TOKENS = 16
PREFILL_RATE_WEIGHT = 0.3
# Asynchronous scheduling sends the next step this long before the running one should end (its predicted compute
# time): late enough that requests arriving meanwhile still join it, early enough that the model process need not
# wait for it (the worker's thread may have to wait for a CPU first).
AHEAD_MARGIN_S = 0.001
AHEAD_MARGIN_SHARE = 0.2
DEFAULT_KV_BLOCK_SIZE = 16
BATCHING_MODES = ("auto", "paged", "sequential")
# Why a CUDA-graph engine takes no LoRA adapter (at the start, and on a runtime load).
LORA_NOT_IN_GRAPHS = "LoRA adapters are not applied in CUDA graph replays: set cuda_graphs false to use adapters"

_seq_ids = itertools.count()  # runner-side identity of a request's KV state (request ids may be reused)


@dataclass
class _Work:
    """One request's part of a step: feed all_ids[start:end]; if end == known, sample after it."""

    req: "_Request"
    start: int
    end: int
    known: int
    # Scheduled ahead (asynchronous scheduling): the one token fed is the one chosen for this logits row of the
    # step still running; `fed` is that token once the running step's result is in.
    previous_row: int | None = None
    fed: int | None = None
    index: int = -1  # the output index of the token this row's logits choose (set at launch)
    # Speculative decoding (Engine._speculate): ids proposed to follow all_ids[:end], fed after it in this chunk;
    # its logits come back at every fed position, and the commit keeps what decoding one by one would have produced.
    proposal: list[int] = field(default_factory=list)
    decodes: int = 0  # the decodes in the step the proposal was made for: what its positions cost (ngram.py)


@dataclass(eq=False)
class _Launched:
    """A step sent to the model process: its work (chunks, and requests sampled from kept logits)."""

    work: list[_Work]
    started: float = field(default_factory=time.perf_counter)  # when the model process could begin it

    @property
    def tokens(self) -> int:
        return sum(w.end - w.start + len(w.proposal) for w in self.work)

    @property
    def chunks(self) -> list[_Work]:
        return [w for w in self.work if w.end > w.start]

    def resolve(self, previous_chosen: list[int]) -> None:
        """The step before this one ended: the tokens its rows chose are what this one's ahead chunks fed."""
        for w in self.work:
            if w.previous_row is not None:
                w.fed = previous_chosen[w.previous_row]


@dataclass(eq=False)
class _EmbedJob:
    """An embed call's inputs, pooled in pieces between steps. Pieces take the inputs shortest first, so that each
    is padded to the longest of inputs of similar length (runner.last_hidden_states); outputs keep the call's order."""

    inputs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[list[float] | None] = field(init=False)  # by input; None until its piece has run
    order: list[int] = field(init=False)  # the input indices, shortest input first
    pooled: int = 0  # how many of `order` have their output
    error: BaseException | None = None
    abandoned: bool = False  # its caller stopped waiting: the engine skips what is left of it
    cancelled: bool = False  # its caller cancelled it by its request_id (Engine.cancel): it stops waiting now

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.inputs)
        self.order = sorted(range(len(self.inputs)), key=lambda i: len(self.inputs[i]))

    def next_piece(self, max_tokens: int) -> list[int]:
        """The indices of the next inputs: as many as fit in max_tokens once padded to the longest of them (the
        forward computes the padding too), at least one."""
        start = self.pooled
        end = start + 1
        while end < len(self.order) and (end + 1 - start) * len(self.inputs[self.order[end]]) <= max_tokens:
            end += 1
        return self.order[start:end]

    def add(self, piece: list[int], outputs: list[list[float]]) -> None:
        for index, output in zip(piece, outputs, strict=True):
            self.outputs[index] = output
        self.pooled += len(piece)

    @property
    def finished(self) -> bool:
        return self.pooled == len(self.inputs)


@dataclass(eq=False)
class _AdapterJob:
    """A runtime LoRA adapter load or unload (EngineBase.load_lora, unload_lora), run by the engine thread between
    steps: never while a step runs, in this process or the model process."""

    action: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(eq=False, kw_only=True)
class _Request(RequestState):
    all_ids: list[int] = field(default_factory=list)  # prompt + output ids: what the model is fed
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_cached: int = 0  # ids whose keys/values are in the cache
    preemptions: int = 0
    first_scheduled: float | None = None
    resumed_tokens: int = 0
    # Logits of the last known id when it was prefilled but not sampled (held or paused): the next step samples.
    pending_logits: torch.Tensor | None = None
    # Penalized, constrained or thinking, asynchronous scheduling: the model process holds this request's TokenState,
    # and this is how many of its output ids that state has taken, counting the rows sent (Engine._child_state sends
    # what it lacks: the tokens a speculative commit took, or a seed of its whole state where this is None). None
    # whenever it may be off: a token it chose not taken (_note_counts_taken), a step not committed
    # (_forget_child_states: it ran out of memory, or was sent ahead of one that did), one it did not choose
    # taken but for a speculative commit's (_state_for_sampling, _on_extended), its KV state freed (_release_kv: the
    # model process drops them too).
    child_state_at: int | None = None
    # A thinking request's ThinkingState, for its speculative commits (thinking_now) where it has no token_state.
    thinking_state: ThinkingState | None = None
    speculation: SpeculationRecord = field(default_factory=SpeculationRecord)  # its acceptance (Engine._speculate)

    def __post_init__(self) -> None:
        self.all_ids = self.prompt_ids + self.output_ids
        self.resumed_tokens = len(self.output_ids)

    def append_output(self, token: int) -> None:
        super().append_output(token)
        self.all_ids.append(token)

    def thinking_now(self) -> ThinkingState | None:
        """Its thinking's state after its output so far (None: it has no thinking rule): its token_state's, which
        takes every token, where this thread samples; else one kept here, advanced over the tokens taken since it
        was last asked for: a speculative commit per step would otherwise scan the whole output."""
        if self.params.thinking is None:
            return None
        if self.token_state is not None:
            return self.token_state.thinking
        if self.thinking_state is None:
            self.thinking_state = ThinkingState(self.params.thinking, self.output_ids)
        return self.thinking_state.advance(self.output_ids)

    @property
    def fully_cached(self) -> bool:
        return self.num_cached == len(self.all_ids)

    @property
    def scores_prompt(self) -> bool:
        """Whether its prefill keeps every prompt position's log probabilities (until its first token is out)."""
        return self.prompt_logprobs is not None and not self.output_ids

    def prompt_targets(self, start: int, end: int) -> list[int]:
        """The prompt ids a chunk feeding positions start..end-1 scores: each position's next token, while that is
        a prompt token."""
        return self.prompt_ids[start + 1:min(end, len(self.prompt_ids) - 1) + 1]

    def has_work(self) -> bool:
        """Whether the engine thread must step this request now."""
        if self.cancel_requested:
            return True
        if self.paused:
            return False
        return not (self.held and self.fully_cached)


class Engine(EngineBase):
    request_type = _Request
    thread_name = "hpcllm-engine"

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
        fast_path: bool = True,
        model_process: "bool | ModelProcess" = False,
        cuda_graphs: bool | str = False,
        model_process_threads: int | None = None,
        async_scheduling: bool = True,
        step_timeout: float | None = None,
        speculative_ngram_tokens: int = 0,
        lora_adapters: dict[str, str] | None = None,
    ) -> None:
        """step_timeout: seconds a model step (or an embedding piece) may take before the engine counts as hung and
        fails (None: never; EngineBase._watch_steps). speculative_ngram_tokens: k of n-gram speculative decoding
        (ngram.py, _speculate); 0: off. lora_adapters: name -> PEFT folder, each request may name one
        (GenerateRequest.lora; lora.py)."""
        if max_running_requests < 1 or max_waiting_requests < 0 or prefill_chunk_tokens < 1:
            raise ValueError("max_running_requests and prefill_chunk_tokens must be >= 1, max_waiting >= 0")
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        if kv_block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, not {kv_block_size}")
        if fastpath.weights_dropped(model):
            raise ValueError("the model's weights were handed to a model process, whose fast path replaced them (this "
                             "copy of the model keeps none of those): give the engine a model as loaded")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.classifies = classifier_head(model) is not None  # a *ForSequenceClassification: pools, never generates
        self.device = model.get_input_embeddings().weight.device  # where input ids go, also under a device_map
        # The same rule as the controller's deploy check and the gateway's (hpcllm.checkpoint.context).
        self.max_model_len = max_model_len_for(model.config.to_dict(), max_model_len,
                                               tokenizer_max_length=getattr(tokenizer, "model_max_length", None))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.max_running_requests = max_running_requests
        self.max_waiting_requests = max_waiting_requests
        self.max_requests = max_requests(max_running_requests, max_waiting_requests)
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
        self.proposer = NgramProposer(speculative_ngram_tokens) if speculative_ngram_tokens else None
        self._init_lora(lora_adapters)
        if self.lora_adapters and cuda_graphs:
            raise ValueError(LORA_NOT_IN_GRAPHS)
        # fast_path: the paged runner fuses and packs the model's projections on CPU (runner.py, fastpath.py).
        if model_process:  # the forward in a child process (runner_process.py): streams run beside it
            # One started ahead (during the load, or by a spare worker), else one now.
            started = model_process if isinstance(model_process, ModelProcess) else ModelProcess()
            self.runner: ModelRunner = ProcessRunner(model, num_blocks=num_blocks, block_size=kv_block_size,
                                                     batching=batching,
                                                     max_rows=max_running_requests * (1 + speculative_ngram_tokens),
                                                     process=started, fast_path=fast_path,
                                                     threads=model_process_threads, tokenizer=tokenizer,
                                                     lora_adapters=self.lora_adapters)
            paged = self.runner.paged
        else:
            self.runner = make_runner(model, num_blocks=num_blocks, block_size=kv_block_size, batching=batching,
                                      fast_path=fast_path, lora_adapters=self.lora_adapters)
            paged = isinstance(self.runner, PagedRunner)
        if cuda_graphs:  # True: capture decode steps (a CUDA model); "eager": their static form, uncaptured
            self._use_decode_graphs("eager" if cuda_graphs == "eager" else "cuda")
            self.lora_refusal = LORA_NOT_IN_GRAPHS
        elif not paged:
            self.lora_refusal = LORA_NEEDS_PAGED
        if self.proposer is not None and not paged and not full_attention_only(model.config):
            # A rejected proposal's positions must leave the cache; the sequential runner's DynamicCache cannot take
            # them back from a layer that drops old positions itself (a sliding window: Gemma 2/3, Mistral v0.1).
            log.info("speculative decoding is off: the sequential runner cannot undo a rejected proposal in this "
                     "model's sliding-window or other non-full attention layers")
            self.proposer = None
        # Shared prompt prefixes need shared KV blocks: the paged runner's (a DynamicCache per request cannot).
        self.kv_pool = BlockPool(num_blocks, kv_block_size, prefix_caching=prefix_caching and paged)
        # With a paged model process, the next step is scheduled and sent while this one runs (_step_pipelined).
        self.async_scheduling = async_scheduling and isinstance(self.runner, ProcessRunner) and paged
        self._ahead: _Launched | None = None  # the step sent while the one being collected ran
        self._step_times = _StepTimes()
        self._spec_step = 0  # steps scheduled: when backed-off requests look up proposals (SpeculationRecord.due)
        self._to_free: list[int] = []  # seq ids whose KV the runner may forget at its next step
        self._embed_jobs: deque[_EmbedJob] = deque()  # run by the engine thread between steps
        self._embed_calls: dict[str, _EmbedJob] = {}  # those whose caller gave an id, to cancel them by (cancel)
        self._adapter_jobs: deque[_AdapterJob] = deque()  # likewise
        self._outbox: list[tuple[queue.SimpleQueue, Event]] = []  # EngineBase._emit: delivered during the next forward
        self._finished_history = finished_history

        self._lock = threading.Condition(threading.RLock())
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # by priority, then admission (_admit keeps the order)
        self._live: dict[str, _Request] = {}
        self._finished: OrderedDict[str, _Request] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self._prefill_rate: float | None = None  # tokens/s of prefill chunks, moving average (migration cost)
        self.step_timeout = step_timeout

    # ---- public API (any thread; submit, generate, tokens and migration are EngineBase's) ----------------------

    def _enqueue(self, state: _Request) -> None:
        request = state.origin
        with self._lock:
            if self._stopping or not self.alive:
                raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
            if request.request_id in self._live:
                raise DuplicateRequest.of(request.request_id)
            # Requests that arrive during a step, or that the KV budget keeps out of free slots, wait too.
            self._refuse_when_full(len(self._waiting) + len(self._running))
            self._finished.pop(request.request_id, None)
            self._bind_lora(state)
            self._live[request.request_id] = state
            self._queue(state)
            self.metrics.num_requests_waiting.set(len(self._waiting))
            self._lock.notify_all()

    def submit(self, request: GenerateRequest) -> RequestStream:
        if self.classifies:
            raise InvalidRequest(f"model {self.model_name!r} is a classification model ({type(self.model).__name__}): "
                                 "it answers /v1/score, /v1/rerank and /v1/classify, it does not generate", "model")
        return super().submit(request)

    def embed(self, inputs: list[list[int]], timeout: float = 600.0,
              request_id: str | None = None) -> list[list[float]]:
        """The pooled outputs of token id lists (runner.pool_last_tokens): the model's final hidden state at the last
        token, L2-normalized (vLLM's default pooling for decoder models); a classifier's head logits at that token.
        Runs on the engine thread between steps, a piece of inputs per forward (_run_embed_piece). With a
        request_id, cancel(request_id) ends it (EngineOverloaded) and its pieces not yet run are skipped."""
        if not inputs:  # Python callers reach here without the HTTP API's checks: the engine thread needs an input
            return []
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequest(f"input[{i}] is empty", "input")
            self._check_token_ids(ids, f"input[{i}]")
            if len(ids) > self.max_model_len:
                raise PromptTooLong(f"input[{i}] has {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.max_model_len} tokens", "input")
        job = _EmbedJob(inputs)
        with self._lock:
            if self._stopping or not self.alive:
                raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
            if request_id is not None:
                if request_id in self._embed_calls or request_id in self._live:
                    raise DuplicateRequest.of(request_id)
                self._embed_calls[request_id] = job
            self._embed_jobs.append(job)
            self._lock.notify_all()
        try:
            if not job.done.wait(timeout):
                job.abandoned = True
                raise EngineOverloaded(f"embedding did not finish within {timeout:g}s")
        finally:
            if request_id is not None:
                with self._lock:
                    self._embed_calls.pop(request_id, None)
        if job.cancelled:
            raise EngineOverloaded(f"embedding {request_id!r} was cancelled by its caller")
        if job.error is not None:
            raise EngineUnavailable(f"embedding failed: {job.error}")
        return job.outputs

    def _use_decode_graphs(self, mode: str) -> None:
        if not isinstance(self.runner, PagedRunner):
            raise ValueError(f"cuda_graphs needs the paged runner in the worker process, not "
                             f"{type(self.runner).__name__} (set batching to auto or paged, model_process to false)")
        self.runner.decode_graphs = DecodeGraphs(self.runner, max_rows=self.max_running_requests,
                                                 max_context=self.max_model_len, mode=mode)

    def _run_embed_piece(self) -> None:
        """The next piece of the oldest embedding job, in one forward: inputs of at most prefill_chunk_tokens tokens
        once padded (one input at least), so the running streams' next step waits no longer for it than for a
        prefill chunk; its padded forward holds no more activations than a chunk's either. A failure other
        than running out of memory kills the engine (its model process died): the job's caller hears why, the
        others' from _end_all."""
        with self._lock:
            while self._embed_jobs and self._embed_jobs[0].abandoned:
                self._embed_jobs.popleft()
            if not self._embed_jobs:
                return
            job = self._embed_jobs[0]
        try:
            piece = job.next_piece(self.prefill_chunk_tokens)
            with self._model_busy():
                job.add(piece, self._embed([job.inputs[i] for i in piece]))
        except torch.OutOfMemoryError as exc:
            self._end_embed_job(job, exc)
        except Exception as exc:
            self._end_embed_job(job, exc)
            raise
        if job.finished:
            self._end_embed_job(job)

    def _end_embed_job(self, job: _EmbedJob, error: BaseException | None = None) -> None:
        with self._lock:
            self._embed_jobs.remove(job)
        job.error = error
        job.done.set()

    def _embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One piece's outputs, from one forward. With a model process the model runs there (the worker's copy no
        longer holds the weights its fast path replaced: ProcessRunner); between steps either way, on the engine
        thread."""
        if isinstance(self.runner, ProcessRunner):
            return self.runner.embed(inputs)
        return self._pool(inputs)

    def _pool(self, inputs: list[list[int]]) -> list[list[float]]:
        return pool_last_tokens(self.model, inputs)

    def _add_adapter(self, name: str, folder: str, config: AdapterConfig) -> None:
        self._between_steps(lambda: self.runner.load_lora(name, folder, config), wait=True)

    def _remove_adapter(self, name: str, folder: str, wait: bool) -> None:
        self._between_steps(lambda: self.runner.unload_lora(name, folder), wait)

    def _between_steps(self, action: Callable[[], None], wait: bool) -> None:
        job = _AdapterJob(action)
        with self._lock:
            if self._stopping or not self.alive:
                if not wait:  # a stopped engine's adapters go with it
                    return
                raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
            self._adapter_jobs.append(job)
            self._lock.notify_all()
        if wait:
            job.done.wait()
            if job.error is not None:
                raise job.error

    def _run_adapter_jobs(self) -> None:
        """The queued adapter loads and unloads, in order. A refused adapter (or one that does not fit in memory)
        is its caller's error; any other failure (the model process died) kills the engine too."""
        while True:
            with self._lock:
                if not self._adapter_jobs:
                    return
                job = self._adapter_jobs.popleft()
            try:
                with self._model_busy():
                    job.action()
            except AdapterError as exc:
                job.error = exc
            except torch.OutOfMemoryError as exc:
                job.error = AdapterError(f"not enough memory for the adapter's weights: {exc}")
            except Exception as exc:
                job.error = EngineUnavailable(f"loading or unloading the adapter failed: {exc}")
                raise
            finally:
                job.done.set()

    def cancel(self, request_id: str, wait: bool = True, timeout: float = 60.0) -> RequestTokens:
        """Stop a request; with wait, return its token ids once the engine has stopped touching it. An embedding
        call (embed's request_id) ends at once, its pieces not yet run skipped; it has no tokens to resume from."""
        with self._lock:
            job = self._embed_calls.get(request_id)
            if job is not None:
                job.abandoned = job.cancelled = True
                job.done.set()
                return RequestTokens(request_id=request_id, state="finished", prompt_token_ids=[],
                                     output_token_ids=[], seed=0, finish_reason="abort")
            req = self._lookup(request_id)
            if req.state == "waiting":
                self._finish(req, "abort")
            elif req.state == "running":
                req.cancel_requested = True
                self._lock.notify_all()
                if wait:
                    self._lock.wait_for(lambda: req.state == "finished", timeout)
            return req.snapshot()

    # ---- live migration, source side (the rest is EngineBase's) ------------------------------------------------

    def migratable_request_ids(self) -> list[str]:
        """Requests a drain should move: running or waiting, not held here, not already leaving."""
        with self._lock:
            return [
                r.request_id for r in [*self._running, *self._waiting]
                if not (r.held or r.paused or r.migrating or r.cancel_requested)
            ]

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self._running), len(self._waiting)

    @property
    def compute_threads(self) -> int:
        """torch's compute threads where the forward runs: the model process's, else this process's."""
        return self.runner.threads if isinstance(self.runner, ProcessRunner) else torch.get_num_threads()

    @property
    def model_process_pid(self) -> int | None:
        """The model process's pid ([worker] model_process); None when the forward runs in this process."""
        return self.runner.pid if isinstance(self.runner, ProcessRunner) else None

    def tokens_in_flight(self) -> int:
        """Known token ids of the requests a drain would move: what a destination must prefill to take them."""
        with self._lock:
            return sum(len(r.all_ids) for r in [*self._running, *self._waiting]
                       if not (r.held or r.paused or r.migrating))

    # ---- a hung step (EngineBase._watch_steps) ----------------------------------------------------------------------

    def _stop_hung_model(self) -> None:
        if isinstance(self.runner, ProcessRunner):  # the engine thread may be blocked on it holding the lock
            self.runner.kill()  # it wakes (the pipe breaks) and ends

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                active = self._next_round(wait=self._ahead is None)
                if active is None:
                    break
                if (self._embed_jobs or self._adapter_jobs) and self._ahead is None:
                    self._deliver_events()
                    self._run_embed_piece()
                    self._run_adapter_jobs()
                if active or self._ahead is not None:
                    self._step(active)

    def _next_round(self, wait: bool = True) -> list[_Request] | None:
        """Drop expired held requests, admit waiting ones into free slots, and return those with work to do;
        block while there is none (until a call or the next hold deadline) if `wait`; None when shutting down."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                next_deadline = self._expire_held(time.monotonic())
                self._admit(preempt=self._ahead is None)  # nothing in flight: a running request may be preempted
                active = [req for req in self._running if req.has_work()]
                if active or self._embed_jobs or self._adapter_jobs or not wait:
                    return active
                self._deliver_events()
                self._lock.wait(None if next_deadline is None else max(0.0, next_deadline - time.monotonic()))

    def _admit(self, preempt: bool = True) -> bool:
        """Admission into free slots, by priority then FIFO, while the KV budget holds the head request's known ids
        (plus the token it samples next). A request that does not fit waits, unless nothing runs (one full context
        always fits) or a lower-priority request runs: that one is preempted for it if `preempt` (at a step
        boundary: no step in flight uses its blocks), else True is returned (a step boundary would admit it)."""
        blocked = False
        while self._waiting:
            req = self._waiting[0]
            if req.cancel_requested:
                self._finish(req, "abort")
                continue
            if len(self._running) >= self.max_running_requests:
                victim = self._victim(lower_than=req.priority)
                if victim is None or not preempt:
                    blocked = victim is not None
                    break
                self._preempt(victim, f"for request {req.request_id} of priority {req.priority}")
                continue
            # A prompt scored position by position needs every position's logits: no cached prefix (vLLM's rule).
            shared = (self.kv_pool.share_prefix(req.seq_id, req.all_ids, req.cache_salt)
                      if req.num_cached == 0 and not req.scores_prompt else 0)
            if not self.kv_pool.grow(req.seq_id, len(req.all_ids) + 1):
                self.kv_pool.free(req.seq_id)
                victim = self._victim(lower_than=req.priority)
                if victim is not None and preempt:
                    self._preempt(victim, f"KV blocks for request {req.request_id} of priority {req.priority}")
                    continue
                blocked = victim is not None
                if self._running:
                    break
                raise RuntimeError(f"KV cache of {self.kv_pool.num_blocks} blocks cannot hold request {req.request_id}")
            if shared:
                req.num_cached = shared
                self.metrics.prefix_cache_hits.inc(shared)
            self.metrics.prefix_cache_queries.inc(len(req.all_ids))
            self._waiting.popleft()
            req.state = "running"
            # Kept in the order steps schedule in, by priority then admission (no sort per step).
            self._running.insert(bisect.bisect_right(self._running, req.priority, key=lambda r: r.priority), req)
        self.metrics.num_requests_waiting.set(len(self._waiting))
        self.metrics.num_requests_running.set(len(self._running))
        return blocked

    def _queue(self, req: _Request, front: bool = False) -> None:
        """Queue req by priority: behind the requests of its priority (new), or before them (preempted: it goes on
        first, as vLLM's FIFO queue puts it back at the front)."""
        find = bisect.bisect_left if front else bisect.bisect_right
        self._waiting.insert(find(self._waiting, req.priority, key=lambda r: r.priority), req)

    def _victim(self, lower_than: int | None = None) -> _Request | None:
        """The running request to preempt first (vLLM's priority rule): the lowest priority (the largest value),
        the newest of those; one holding KV blocks. lower_than: only one of a priority after it, and not held or
        paused (a migration's, whose state a preemption would drop) nor being cancelled (the step ends it)."""
        for r in reversed(self._running):  # lowest priority, newest first (the order _running is kept in)
            if lower_than is not None:
                if r.priority <= lower_than:
                    return None
                if r.held or r.paused or r.cancel_requested:
                    continue
            if self.kv_pool.holds(r.seq_id):
                return r
        return None

    # ---- one step: schedule, run, sample ---------------------------------------------------------------------------

    def _step(self, active: list[_Request]) -> None:
        for req in active:
            if req.cancel_requested:
                self._finish(req, "abort")
        if self.async_scheduling:
            self._step_pipelined(active)
            return
        with self._lock:
            work = self._speculate(self._schedule([r for r in active if r.state == "running" and r.has_work()]))
            chunks = [w for w in work if w.end > w.start]
            batch = self._batch(chunks)
        if not chunks:
            self._deliver_events()
        if not work:
            return
        logits = argmax = None
        if chunks:
            began = time.perf_counter()
            try:
                with self._model_busy():  # a GPU's work ends at the host copies below: they wait for it too
                    logits = self._run_step(batch)
                    # Greedy rows in one argmax over the step's logits (same first-maximum rule as per row).
                    argmax = logits.argmax(dim=-1).tolist() if len(logits) else []
                    if logits.device.type != "cpu" and any(_needs_logits(w.req) for w in work):
                        logits = logits.float().cpu()  # one device-to-host copy per step, not one per sampled row
            except torch.OutOfMemoryError as exc:
                self._out_of_memory([w.req for w in chunks], exc)
                return
            self._observe_prefill(chunks, began)
        self._commit(work, logits, argmax, scores=batch.scores)

    def _step_pipelined(self, active: list[_Request]) -> None:
        """Asynchronous scheduling (vLLM's): while a step runs in the model process, the next one is scheduled as
        if each of its sampling rows had taken its token, and sent; the model process chooses that token itself
        (runner_process.choose_tokens) and goes on without waiting for this thread to sample, commit and schedule.
        Tokens reach the streams when this thread commits them, a step behind the model as before. A row whose
        request ended meanwhile (a stop, a cancel, a pause) is dropped at its commit, and what its step wrote to the
        cache is not counted: the next step that feeds that position writes it again."""
        current, self._ahead = self._ahead, None
        if current is None:
            with self._lock:
                work = self._speculate(self._schedule([r for r in active if r.state == "running" and r.has_work()]))
                current = self._launch(work) if any(w.end > w.start for w in work) else None
            if current is None:  # only requests sampled from kept logits (attached, unpaused), or nothing
                self._deliver_events()
                self._commit(work, None)
                return
        self._deliver_events()
        if not (self._embed_jobs or self._adapter_jobs):  # they run between steps: none is sent ahead of them
            self.runner.wait(self._time_to_send_ahead(current))
            with self._lock:
                ahead = self._schedule_ahead(current)
                self._ahead = self._launch(ahead) if ahead else None
        try:
            with self._model_busy():
                result = self.runner.collect()
        except torch.OutOfMemoryError as exc:
            self._discard_ahead()
            _forget_child_states(current.work)  # its states took what the step sent, but chose no token
            self._out_of_memory([w.req for w in current.chunks], exc)
            return
        if self._ahead is not None:
            self._ahead.resolve(result.chosen)
            self._ahead.started = max(self._ahead.started, time.perf_counter())
        self._step_times.observe(current.tokens, result.seconds)
        self._observe_prefill(current.chunks, seconds=result.seconds)
        self._commit(current.work, result.logits, chosen=result.chosen, scores=result.scores)

    def _batch(self, chunks: list[_Work]) -> StepBatch:
        """The runner's view of a step's chunks, with the KV states it may forget (under the lock)."""
        batch = StepBatch(chunks=[SequenceChunk(w.req.seq_id, [0] if w.previous_row is not None
                                                else w.req.all_ids[w.start:w.end] + w.proposal, w.start,
                                                self.kv_pool.table(w.req.seq_id), w.end == w.known,
                                                previous_row=w.previous_row, logits_positions=1 + len(w.proposal),
                                                lora=w.req.lora_key)
                                  for w in chunks])
        for chunk, w in zip(batch.chunks, chunks):
            if w.req.scores_prompt and w.previous_row is None:
                chunk.score_ids, chunk.score_top = w.req.prompt_targets(w.start, w.end), w.req.prompt_logprobs
        if chunks:
            batch.free, self._to_free = self._to_free, []
        return batch

    def _launch(self, work: list[_Work]) -> _Launched:
        """Send a step to the model process, with how each row's token is chosen (under the lock)."""
        launched = _Launched(work)
        chunks = launched.chunks
        batch = self._batch(chunks)
        batch.choices = []
        for w in chunks:
            if w.proposal:  # chosen at the commit, up to the first rejected position (_commit_speculative)
                batch.choices.extend([None] * (1 + len(w.proposal)))
            elif w.end == w.known:
                req = w.req
                w.index = len(req.output_ids) + (w.previous_row is not None)
                wanted = not (req.held or req.paused)
                if wanted and req.params.reads_tokens:
                    self._child_state(batch, w)
                batch.choices.append((req.params, w.index) if wanted else None)
        with self._model_busy():  # a model process that stopped reading leaves the send blocked once its pipe is full
            self.runner.launch(batch)
        return launched

    @staticmethod
    def _child_state(batch: StepBatch, w: _Work) -> None:
        """What the model process's TokenState of w's request lacks before it chooses w's row, into the batch: the
        output ids a speculative commit took since (StepBatch.state_tokens), or, where it has none or one that is
        off, a seed to build it from (the prompt only for penalties, the one part that reads it): sent once per
        request, not after every speculative step (under the lock)."""
        req = w.req
        at = req.child_state_at
        if at is not None and at < w.index == len(req.output_ids):
            batch.state_tokens[req.seq_id] = req.output_ids[at:]
        elif at != w.index:
            batch.state_seeds[req.seq_id] = StateSeed(list(req.prompt_ids) if req.params.penalized else [],
                                                      list(req.output_ids), req.grammar)
        req.child_state_at = w.index + 1

    def _time_to_send_ahead(self, current: _Launched) -> float:
        """Seconds to wait before sending the step after `current`: until shortly before it should end."""
        predicted = self._step_times.predict(current.tokens)
        if predicted is None:
            return 0.0
        margin = max(AHEAD_MARGIN_S, AHEAD_MARGIN_SHARE * predicted)
        return max(0.0, current.started + predicted - margin - time.perf_counter())

    def _discard_ahead(self) -> None:
        """The running step failed: collect the one sent ahead (skipped, or run on stale input) and drop it."""
        if self._ahead is None:
            return
        _forget_child_states(self._ahead.work)  # its rows' tokens, if chosen, are not taken
        self._ahead = None
        with contextlib.suppress(StepSkipped, torch.OutOfMemoryError):  # its result is dropped either way
            self.runner.collect()

    def _schedule_ahead(self, current: _Launched) -> list[_Work] | None:
        """The step after `current`, scheduled while it runs, as if each of its sampling rows took its token (under
        the lock; the step before `current` is committed). None when the next step needs a step boundary: a request
        samples from kept logits, or KV blocks are only to be had by preemption."""
        if self.proposer is not None and (any(w.proposal for w in current.work) or any(
                self._may_speculate(r) and r.speculation.due(self._spec_step + 1) for r in self._running)):
            # How many tokens a speculation accepts is known only at its commit, and a proposal follows the ids
            # after it: a step where a request speculates, or looks up a proposal, waits for a step boundary.
            return None
        # Requests that arrived while `current` ran join the next step, as they would without this; one that is to
        # preempt a lower-priority request waits for a step boundary (no step in flight then uses the freed blocks).
        if self._admit(preempt=False):
            return None
        in_current, rows = {}, {}
        for w in current.work:
            in_current[w.req.seq_id] = w
            if w.end > w.start and w.end == w.known:
                rows[w.req.seq_id] = len(rows)
        work: list[_Work] = []
        prefill_budget = self.prefill_chunk_tokens
        for req in self._running:
            if req.state != "running" or req.cancel_requested or req.paused:
                continue
            previous_row = None
            w = in_current.get(req.seq_id)
            if w is not None and w.end == w.start:
                continue  # samples from kept logits at current's end: it decodes the step after next
            if w is not None and _still_matches(w):  # current's chunk will count: go on from its end
                if req.seq_id in rows:  # its row samples at the end of `current`: feed that token next
                    if req.held or not self._continues(req):
                        continue
                    start, previous_row = w.end, rows[req.seq_id]
                    end = known = start + 1
                else:  # mid-prefill: its next chunk
                    start, known = w.end, len(req.all_ids)
            else:  # not in current, or its chunk there will be dropped (the request changed): from what is cached
                if not req.has_work():
                    continue
                start, known = req.num_cached, len(req.all_ids)
                if start == known:
                    return None  # samples from kept logits: at a step boundary
            if previous_row is None:
                chunk = _chunk_end(start, known, prefill_budget)
                if chunk is None:
                    continue
                end, prefill_budget = chunk
            if not self.kv_pool.grow(req.seq_id, end):
                return None  # blocks only by preemption, which waits for a step boundary
            self._note_scheduled(req)
            work.append(_Work(req, start, end, known, previous_row=previous_row))
        if work:
            self._spec_step += 1
        return work or None

    def _continues(self, req: _Request) -> bool:
        """Whether req goes on after its next token, unless that token stops it (a stop token, a stop string)."""
        return len(req.output_ids) + 1 < req.max_tokens and len(req.all_ids) + 1 < self.max_model_len

    def _commit(self, work: list[_Work], logits: torch.Tensor | None, argmax: list[int] | None = None,
                chosen: list[int] | None = None, scores: dict[int, PositionScores] | None = None) -> None:
        """A step's results: count the cached ids, register full blocks, keep prompt scores, sample and emit.
        argmax: each row's maximum (greedy rows take it); chosen: each row's token as the model process chose it
        (_step_pipelined), whose chunks may have been scheduled before their request changed: one that no longer
        matches its request is dropped; scores: StepBatch.scores."""
        chunks = [w for w in work if w.end > w.start]
        with self._lock:
            valid = {id(w): chosen is None or _still_matches(w) for w in chunks}
            for w in chunks:
                if valid[id(w)]:
                    self.kv_pool.register(w.req.seq_id, w.req.all_ids, w.end, w.req.cache_salt)
        row = 0
        for w in work:
            if w.end == w.start:
                self._sample_or_fail(w.req, w.req.pending_logits)
                continue
            samples = w.end == w.known
            if valid[id(w)]:
                w.req.num_cached = w.end
                if scores and w.req.seq_id in scores:
                    self._keep_prompt_scores(w, scores[w.req.seq_id])
                if w.proposal:
                    rows = logits[row:row + 1 + len(w.proposal)]
                    if not w.req.params.raw_argmax:
                        picks = None  # sampled position by position, up to the first rejected one
                    else:
                        picks = argmax[row:row + len(rows)] if argmax is not None else rows.argmax(dim=-1).tolist()
                    self._commit_speculative(w, rows, picks)
                elif samples and chosen is None:
                    self._sample_or_fail(w.req, logits[row], argmax[row])
                elif samples:
                    # -1: held or paused at launch (no token asked for); a changed index: extended since.
                    token = chosen[row] if chosen[row] >= 0 and len(w.req.output_ids) == w.index else None
                    self._sample_or_fail(w.req, logits[row], chosen=token)
            if samples and chosen is not None and not w.proposal:  # a proposal's rows: chosen here, none there
                self._note_counts_taken(w, chosen[row])
            if samples:
                row += 1 + len(w.proposal)  # a speculative chunk's rows: every fed position's

    def _commit_speculative(self, w: _Work, logits: torch.Tensor, picks: list[int] | None) -> None:
        """A speculative chunk's result: the tokens sampling.verify_proposal keeps (picks: per row, the argmax; None:
        each drawn with the seed of its output index, which for a sampled request is rejection sampling), emitted
        one by one, each after the ids before it count as cached (the keys/values of rejected positions are
        overwritten when their positions are fed again). A request that may not take tokens now (cancelled, paused)
        gets the first row, as a plain decode would."""
        req, proposal = w.req, w.proposal
        base = len(req.output_ids)
        thinking = req.thinking_now()
        try:
            tokens = verify_proposal(proposal, picks.__getitem__ if picks is not None
                                     else lambda at: sample_token(logits[at], req.params, base + at),
                                     copy.copy(thinking) if thinking is not None else None)
        except Exception as exc:
            log.exception("request %s failed while sampling its next tokens", req.request_id)
            self._finish(req, "error", error=ErrorInfo(message=f"{type(exc).__name__}: {exc}", type="server_error"))
            return
        accepted = len(tokens) - 1
        self.metrics.spec_proposed_tokens.inc(len(proposal))
        self.metrics.spec_accepted_tokens.inc(accepted)
        req.speculation.observe(len(proposal), accepted, self.proposer.tokens, w.decodes)
        with self._lock:
            takes = req.state == "running" and not (req.cancel_requested or req.paused or req.held)
            # The model process chose none of these: its TokenState (thinking) is behind by the tokens taken, which
            # its next row sends (_child_state).
            if takes and len(req.all_ids) == w.end:
                try:
                    for token in tokens:
                        req.num_cached = len(req.all_ids)
                        self._accept(req, token)
                        if req.state != "running":  # a stop token or string, max_tokens, the context's end
                            break
                except Exception as exc:
                    log.exception("request %s failed while taking its tokens", req.request_id)
                    self._finish(req, "error", error=ErrorInfo(message=f"{type(exc).__name__}: {exc}",
                                                               type="server_error"))
                return
        self._sample_or_fail(req, logits[0], tokens[0])

    def _may_speculate(self, req: _Request) -> bool:
        """Whether req's decodes may be speculated: its token at every fed position is chosen from that position's
        logits alone (greedy or sampled, with logit bias; not penalties or a grammar, whose state would have to
        advance through the proposal; a thinking budget's forced end marker: verify_proposal), no logprobs, not held
        or paused."""
        return (self.proposer is not None and not req.params.masks_logits and req.logprobs is None
                and not (req.held or req.paused or req.cancel_requested))

    def _speculate(self, work: list[_Work]) -> list[_Work]:
        """Give the step's decodes an n-gram proposal each (ngram.py) where the request is due to look one up, one
        matches and KV blocks for it are free, as long as its acceptance pays for verifying one at this many decodes
        (SpeculationRecord; else the proposal is only watched): speculation never preempts, and runs after every
        chunk of the step has its blocks (under the lock)."""
        if self.proposer is None:
            return work
        self._spec_step += 1
        decodes = [w for w in work if w.end - w.start == 1 and w.end == w.known]
        for w in decodes:
            req = w.req
            record, tokens = req.speculation, self.proposer.tokens
            if not self._may_speculate(req) or not record.due(self._spec_step):
                continue
            record.score_watched(req.all_ids, tokens, len(decodes))
            length = record.length(tokens, len(decodes))
            # No position past the context, no token past max_tokens: at most what one-by-one decoding would emit.
            limit = min(length or tokens, req.max_tokens - len(req.output_ids) - 1,
                        self.max_model_len - len(req.all_ids) - 1)
            proposal = self.proposer.propose(req.all_ids, limit)
            if not proposal:
                if self.async_scheduling:  # a lookup costs the step sent ahead, not the lookup's time
                    record.missed()
            elif not length:  # verifying would not pay: watch it instead, to notice when the output starts to copy
                record.watch(proposal, len(req.all_ids))
            elif self.kv_pool.grow(req.seq_id, w.end + len(proposal)):
                w.proposal, w.decodes = proposal, len(decodes)
        return work

    @staticmethod
    def _note_counts_taken(w: _Work, chosen: int) -> None:
        """After a pipelined row's commit: the model process's TokenState took its choice at output index w.index;
        unless that is now the request's last output token, its state there is off (the token was dropped, or the
        worker sampled another) and the request's next row sends it again (_child_state)."""
        req = w.req
        if req.child_state_at is not None and not (len(req.output_ids) == w.index + 1
                                                   and req.output_ids[-1] == chosen):
            req.child_state_at = None

    def _sample_or_fail(self, req: _Request, logits: torch.Tensor | None, argmax: int | None = None,
                        chosen: int | None = None) -> None:
        """_sample_and_commit, where a failure is the request's alone (its logits, sampling, logprobs, detokenizing):
        it ends that request with an error and the traceback goes to the log; the other requests go on."""
        try:
            self._sample_and_commit(req, logits, argmax, chosen)
        except Exception as exc:
            log.exception("request %s failed while sampling its next token", req.request_id)
            self._finish(req, "error", error=ErrorInfo(message=f"{type(exc).__name__}: {exc}", type="server_error"))

    def _schedule(self, candidates: list[_Request]) -> list["_Work"]:
        """Pick each request's chunk (decodes whole, prefills within prefill_chunk_tokens per step, higher
        priorities first) and give it KV blocks, preempting the lowest-priority newest running requests when blocks
        run out (those come later in this order: never one already scheduled). candidates: in _running's order.
        Called under the lock."""
        work: list[_Work] = []
        prefill_budget = self.prefill_chunk_tokens
        for req in candidates:
            if req.state != "running":  # preempted for an earlier request's blocks in this very loop
                continue
            self._note_scheduled(req)
            start, known = req.num_cached, len(req.all_ids)
            chunk = _chunk_end(start, known, prefill_budget)
            if chunk is None:
                continue
            end, prefill_budget = chunk
            if not self._make_room(req, end):
                continue  # req itself was preempted
            work.append(_Work(req, start, end, known))
        return work

    def _note_scheduled(self, req: _Request) -> None:
        if req.first_scheduled is None:
            req.first_scheduled = time.monotonic()
            self.metrics.request_queue_time.observe(req.first_scheduled - req.arrival)
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))

    def _make_room(self, req: _Request, tokens: int) -> bool:
        """Grow req's blocks to `tokens`, preempting running requests (_victim) while none are free; False if req
        itself was the one to preempt."""
        while not self.kv_pool.grow(req.seq_id, tokens):
            victim = self._victim()
            if victim is None:
                raise RuntimeError("KV cache exhausted with nothing to preempt")  # max_model_len fits: unreachable
            self._preempt(victim, KV_CACHE_FULL)
            if victim is req:
                return False
        return True

    def _preempt(self, req: _Request, reason: str) -> None:
        """Free req's KV cache and queue it first of its priority: it is re-prefilled from its token ids (vLLM's
        recompute). A held request (a migration's destination) is dropped instead: queued again, it would wait for
        this full cache while the source's hand-over waits for it, the client's stream paused; the source serves on.
        A request being cancelled (a cancel during the step that ran out of memory) ends instead: queued, it would
        end only once it reached the queue's head."""
        if req.cancel_requested:
            self._finish(req, "abort")
            return
        if req.held:
            log.info("dropping held request %s: preempted (%s)", req.request_id, reason)
            req.drop_reason = preempted_reason(reason)
            self._finish(req, "abort")
            return
        log.info("preempting request %s (%s): %d tokens to recompute", req.request_id, reason, len(req.all_ids))
        self._release_kv(req)
        req.num_cached, req.pending_logits = 0, None
        req.preemptions += 1
        self._running.remove(req)
        req.state = "waiting"
        self._queue(req, front=True)
        self.metrics.preemptions.inc()

    def _release_kv(self, req: _Request) -> None:
        """Free req's KV blocks; the runner forgets its KV state (the model process its TokenStates too) at the
        next step."""
        if self.kv_pool.holds(req.seq_id) or req.num_cached:
            self._to_free.append(req.seq_id)
        self.kv_pool.free(req.seq_id)
        req.child_state_at = None

    def _out_of_memory(self, requests: list[_Request], exc: BaseException) -> None:
        """The device ran out of memory in a step: the requests cancelled meanwhile end (abort: their clients left),
        and the rest are retried with less beside them; where none was, alone the request fails, in a batch the
        lowest-priority newest still running is preempted (another thread may have ended some meanwhile: an extend
        that ended a held request) and the rest retried."""
        with self._lock:
            cancelled = [r for r in requests if r.state == "running" and r.cancel_requested]
            for req in cancelled:
                self._finish(req, "abort")
            if cancelled:
                return
            running = [r for r in requests if r.state == "running"]
            if len(requests) > 1:
                if running:
                    self._preempt(max(running, key=self._running.index), "out of memory")  # by priority, admission
                return
        if running:
            log.warning("request %s ran out of memory: %s", running[0].request_id, exc)
            self._finish(running[0], "error", error=ErrorInfo(message=f"out of memory: {exc}", type="server_error"))

    def _sample_and_commit(self, req: _Request, logits: torch.Tensor | None, argmax: int | None = None,
                           chosen: int | None = None) -> None:
        """Sample req's next token from its logits (argmax: their maximum, computed for the whole step; chosen: the
        token already chosen by the same rule, by the model process) and emit it."""
        if logits is None:
            raise RuntimeError(f"request {req.request_id}: nothing to sample from (no prefilled logits)")
        # Sample outside the lock; the commit below re-checks that the request may still take a token.
        if req.held or req.paused:
            token = None
        elif chosen is not None:
            token = chosen
        elif req.params.raw_argmax and argmax is not None:  # a spent thinking budget's end marker replaces it
            token = argmax if req.params.thinking is None else forced_or(self._state_for_sampling(req, logits), argmax)
        else:
            token = sample_token(logits, req.params, len(req.output_ids), self._state_for_sampling(req, logits))
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

    def _state_for_sampling(self, req: _Request, logits: torch.Tensor) -> TokenState | None:
        """A penalized, constrained or thinking request's TokenState: kept by the request where this thread samples
        its every token, built for this one token under asynchronous scheduling (the model process keeps it and
        chooses the others; this thread samples only after a step boundary: attached, unpaused, extended)."""
        grammar_tokenizer = self.grammar_tokenizer if req.params.constrained else None
        if self.async_scheduling and req.params.reads_tokens:
            req.child_state_at = None  # nor does the model process take the token sampled here
            return TokenState.build(req.params, logits.shape[-1], req.prompt_ids, req.output_ids, req.grammar,
                                    grammar_tokenizer)
        return req.state_for_sampling(logits.shape[-1], grammar_tokenizer)

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        """The sampled token's log probability and the `top` most likely tokens' (raw model distribution)."""
        logprobs = torch.log_softmax(logits.detach().to("cpu", torch.float32), dim=-1)
        best = torch.topk(logprobs, top) if top else None
        if best is None:
            return self._token_logprobs([token], [float(logprobs[token])], [[]], [[]])[0]
        return self._token_logprobs([token], [float(logprobs[token])], [best.indices.tolist()],
                                    [best.values.tolist()])[0]

    def _keep_prompt_scores(self, w: _Work, scores: PositionScores) -> None:
        """A prefill chunk's prompt scores, as the entries of the positions after it (a chunk prefilled again after
        a preemption replaces what it scored before)."""
        req = w.req
        del req.prompt_logprobs_result[w.start + 1:]
        req.prompt_logprobs_result.extend(self._token_logprobs(req.prompt_targets(w.start, w.end), scores.logprobs,
                                                               scores.top_ids, scores.top_logprobs, scores.ranks))

    def _observe_prefill(self, chunks: list[_Work], began: float | None = None, seconds: float | None = None) -> None:
        """The prefill rate from a step with enough prefill in it: its tokens over `seconds` (the model process's
        compute time), else over the time since `began`."""
        if sum(w.end - w.start for w in chunks if w.end - w.start > 1) < PREFILL_RATE_MIN_TOKENS:
            return
        if seconds is None:
            if self.device.type == "cuda":  # the forward only queued the kernels
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - began
        rate = sum(w.end - w.start for w in chunks) / max(seconds, 1e-6)
        previous = self._prefill_rate
        self._prefill_rate = rate if previous is None else previous + PREFILL_RATE_WEIGHT * (rate - previous)

    def _run_step(self, batch: StepBatch) -> torch.Tensor:
        """The step's forward; the previous step's stream events are delivered while it runs (with a model process)
        or just before it (in this process, where the streams would wait for the GIL anyway)."""
        if not isinstance(self.runner, ProcessRunner):
            self._deliver_events()
            return self._forward(batch)
        self.runner.launch(batch)
        self._deliver_events()
        result = self.runner.collect()
        batch.scores.update(result.scores)
        return result.logits

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        return self.runner.step(batch)

    # ---- EngineBase's hooks -------------------------------------------------------------------------------------

    def _release(self, req: _Request) -> None:
        if req.state == "running":
            self._running.remove(req)
        elif req in self._waiting:
            self._waiting.remove(req)
        self._release_kv(req)
        req.pending_logits = None

    def _cached_tokens(self, req: _Request) -> int:
        return req.num_cached

    def _on_extended(self, req: _Request) -> None:
        req.pending_logits = None  # they were for the old last position
        req.child_state_at = None  # the model process did not count the tokens given

    def _end_all(self) -> None:
        with self._lock:
            for job in [*self._embed_jobs, *self._adapter_jobs]:
                job.error = EngineUnavailable(self.error or "the engine shut down")
                job.done.set()
        super()._end_all()
        if isinstance(self.runner, ProcessRunner):
            self.runner.close()


def _forget_child_states(work: list[_Work]) -> None:
    """A sent step that is not committed (it failed, or was dropped after one that did): the model process's
    TokenStates of its requests may hold less or more than their rows counted (Engine._child_state), so each
    request's next row seeds its state again."""
    for w in work:
        w.req.child_state_at = None


class _StepTimes:
    """A step's compute time predicted as a + b x tokens, fitted to recent steps (exponentially weighted least
    squares): when to send the next step ahead of the running one (Engine._step_pipelined)."""

    WEIGHT = 0.1

    def __init__(self) -> None:
        self.steps = 0
        self.mean_x = self.mean_y = self.mean_xx = self.mean_xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        weight = self.WEIGHT if self.steps else 1.0
        self.steps += 1
        self.mean_x += weight * (tokens - self.mean_x)
        self.mean_y += weight * (seconds - self.mean_y)
        self.mean_xx += weight * (tokens * tokens - self.mean_xx)
        self.mean_xy += weight * (tokens * seconds - self.mean_xy)

    def predict(self, tokens: int) -> float | None:
        if self.steps < 2:
            return None
        variance = self.mean_xx - self.mean_x ** 2
        slope = max(0.0, (self.mean_xy - self.mean_x * self.mean_y) / variance) if variance > 1e-9 else 0.0
        return max(0.0, self.mean_y + slope * (tokens - self.mean_x))


def _chunk_end(start: int, known: int, prefill_budget: int) -> tuple[int, int] | None:
    """(end, prefill budget left) of a request's chunk from `start`: a decode feeds the one token sampled last (a
    request sampling from kept logits feeds none), a prefill at most the step's prefill budget; None when that is
    spent."""
    if known - start <= 1:
        return known, prefill_budget
    end = start + min(known - start, prefill_budget)
    return (end, prefill_budget - (end - start)) if end > start else None


def _still_matches(w: _Work) -> bool:
    """Whether a chunk scheduled ahead still fits its request: running, cached up to where the chunk starts, and
    (a chunk that fed the previous row's token) that token taken as its next id."""
    req = w.req
    if req.state != "running" or req.num_cached != w.start:
        return False
    return w.previous_row is None or (len(req.all_ids) == w.end and req.all_ids[w.start] == w.fed)


def _needs_logits(req: _Request) -> bool:
    """Whether a request's logits row is read beyond the step's argmax (sampled, logprobs, or kept while held)."""
    return not req.params.raw_argmax or req.logprobs is not None or req.held or req.paused


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
