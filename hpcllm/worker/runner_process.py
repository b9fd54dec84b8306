"""The model step in its own process (`[worker] model_process = true`): the engine's ModelRunner seam over a pipe.

Why: the engine thread shares the worker process's GIL with the HTTP threads (one per stream). Under load every
token wakes a stream thread that takes the GIL in the middle of the model's forward (which releases and retakes it
around every torch op), so the forward, mostly Python for small models, is stretched by the streaming work, and on
a busy machine a GIL holder that the OS deschedules stalls the engine too. With the forward in a child process
(vLLM's engine core does the same), the child has no other Python threads, and while it computes the worker's
threads (streams, HTTP, the engine's bookkeeping) run on another core.

The split is at the existing seam: a StepBatch (plain ints) goes down the pipe, the child's runner (make_runner,
unchanged: PagedRunner or SequentialRunner over the same model) runs it, and its logits come back through a shared
float32 buffer of max_rows x vocab allocated once (no per-step shared-memory segment). The model's weights are not
copied per process: the model goes down the pipe once, pickled by torch.multiprocessing, which moves CPU tensors
into shared memory (once; the worker then uses the shared copy too) and passes CUDA tensors by IPC handle. The
child is spawned first (model_process.ModelProcess, torch-free), so its torch/transformers imports overlap the
worker's own imports and model load. The KV
cache lives in the child. The scheduler, block pool, sampling, detokenization and streams stay in the worker.
The child's fast path replaces most weights by its own fused, packed copies: it names them, and the worker drops
them from its copy of the model too (their shared pages go back to the OS: server._discard_dropped_weights), so
embeddings run in the child as well ("embed", between steps): each weight is held once.

launch(batch) returns at once; collect() waits for the logits: the engine delivers the previous step's stream
events in between, while the child computes (Engine._forward).

Asynchronous scheduling (Engine, docs/worker.md): the child also chooses each logits row's token by the engine's
own rule (greedy argmax, or the seeded draw for that output index: sampling.py), so the engine can send the next
step while this one runs, its decode chunks naming the row whose token they feed (SequenceChunk.previous_row). The
child then goes from one step to the next without waiting for the worker to sample, commit and schedule. A penalized
request's token counts, a constrained one's grammar state and a thinking one's budget live here too (TokenStates), so
their rows are chosen here like the others; a grammar comes once, with the request's state seed, never with the
per-step choices. Two steps may be in flight; their logits go to two shared buffers in turn. A step that follows a
failed one (out of memory) and needs its tokens is answered "skipped".
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.multiprocessing  # registers the pickling of tensors by shared memory / CUDA IPC used on the pipe

from hpcllm.procs import freeze_startup_heap
from hpcllm.worker import fastpath
from hpcllm.worker.runner import PagedRunner, StepBatch, pool_last_tokens, make_runner
from hpcllm.worker.grammar import grammar_compiler
from hpcllm.worker.lora_config import AdapterConfig, AdapterError
from hpcllm.worker.sampling import TokenState, forced_or, sample_token

log = logging.getLogger(__name__)

MAX_STEPS_IN_FLIGHT = 2  # the step running and the one sent ahead of it (one logits buffer each)


class ModelProcessError(RuntimeError):
    """The model process failed or died: the engine is dead (its loop ends, /health answers 503)."""


class StepSkipped(RuntimeError):
    """The model process did not run a step that fed tokens of a step that failed before it."""


class StepResult(NamedTuple):
    logits: torch.Tensor  # [rows, vocab] float32, a copy
    chosen: list[int]  # per row, the token chosen by batch.choices (-1 where none was asked for)
    seconds: float  # the step's compute time in the model process
    scores: dict  # StepBatch.scores: the scored chunks' prompt log probabilities (runner.PositionScores)


class ProcessRunner:
    """A ModelRunner whose steps run in a child process holding the model and its KV cache."""

    def __init__(self, model, *, num_blocks: int, block_size: int, batching: str, max_rows: int,
                 process, fast_path: bool = True, threads: int | None = None, tokenizer=None,
                 lora_adapters: dict[str, str] | None = None) -> None:
        """process: the model_process.ModelProcess to hand the model (started ahead: while the model loaded, or by
        a spare worker); the runner owns it from here (closes it when it fails to start, or at close()).
        fast_path, lora_adapters: make_runner's (the adapters are read there). tokenizer: the model's, for
        constrained requests' grammars (grammar.py)."""
        if fastpath.is_packed(model):  # oneDNN tensors cannot be shared with the child
            process.close()
            raise ValueError("the model's weights were already packed by an in-process engine's fast path: give the "
                             "model process a model as loaded")
        self._model_process = process
        self._conn, self._process = self._model_process.conn, self._model_process.process
        if not self._model_process.wait_imported():
            self.close()
            raise ModelProcessError(f"the model process died while importing (exit code {self._process.exitcode})")
        setup = {"model": model, "num_blocks": num_blocks, "block_size": block_size, "batching": batching,
                 "max_rows": max_rows, "threads": threads or torch.get_num_threads(), "fast_path": fast_path,
                 "tokenizer": tokenizer, "lora_adapters": lora_adapters}
        self._send(("load", setup))  # torch.multiprocessing's pickler: weights by shared memory / IPC
        kind, payload = self._receive()
        if kind == "error":
            self.close()
            raise ValueError(payload)  # make_runner's refusal (e.g. batching="paged" for a model it cannot serve)
        self.paged: bool = payload["paged"]  # prefix caching needs the paged runner's shared blocks
        self.threads: int = payload["threads"]  # the child's torch compute threads
        self._logits: list[torch.Tensor] = payload["logits"]  # two [max_rows, vocab] float32 in shared memory
        self._in_flight = 0  # steps launched and not collected yet
        # The child's fast path replaced these weights by its own fused, packed copies: this copy of the model lets
        # them go too (meta tensors), and dropped_ranges (this process's addresses) is what the loader's shared
        # buffers may give back (the worker: LoadedModel.discard, MADV_REMOVE: gone for both processes).
        self.fast_path: fastpath.FastPath = payload["fast_path"]
        self.fast_path.dropped_ranges = fastpath.drop_weights(model, self.fast_path.dropped_weights)

    @property
    def pid(self) -> int:
        return self._process.pid

    def launch(self, batch: StepBatch) -> None:
        """Start a step in the model process (after the one in flight, if any); collect() returns its result."""
        if self._in_flight >= MAX_STEPS_IN_FLIGHT:
            raise RuntimeError(f"{self._in_flight} steps are already in flight in the model process")
        self._send(("step", batch))
        self._in_flight += 1

    def collect(self) -> StepResult:
        """The oldest launched step's result; StepSkipped if it was not run (it fed a failed step's tokens)."""
        self._in_flight -= 1
        rows, buffer, chosen, seconds, scores = self._result()
        # A copy: the buffer takes the step after next, and the engine may keep rows past it.
        return StepResult(self._logits[buffer][:rows].clone(), chosen, seconds, scores)

    def step(self, batch: StepBatch) -> torch.Tensor:
        self.launch(batch)
        result = self.collect()
        batch.scores.update(result.scores)
        return result.logits

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for the oldest launched step's result; whether it is in."""
        return self._conn.poll(max(0.0, seconds))

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """The pooled outputs of token id lists (runner.pool_last_tokens), one forward in the model process between
        steps."""
        if self._in_flight:
            raise RuntimeError("a step is running in the model process")
        self._send(("embed", inputs))
        return self._result()

    def load_lora(self, name: str, folder: str, config: AdapterConfig) -> None:
        """Install an adapter in the model process's runner, between steps (lora.LoraLayers.add's refusals raised
        here as the same AdapterError); config: the one the engine's load_lora read, sent along."""
        self._lora_call("load", name, folder, config)

    def unload_lora(self, name: str, folder: str) -> None:
        self._lora_call("unload", name, folder)

    def _lora_call(self, *call) -> None:
        if self._in_flight:
            raise RuntimeError("a step is running in the model process")
        self._send(("lora", call))
        refusal = self._result()
        if refusal is not None:
            raise AdapterError(refusal)

    def close(self) -> None:
        """Stop the model process (the engine's loop ended)."""
        self._model_process.close()

    def kill(self) -> None:
        """End a model process that stopped answering (a hung step): whoever waits for its reply gets
        ModelProcessError."""
        self._process.kill()

    def _send(self, message: tuple[str, object]) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError) as exc:
            raise ModelProcessError(f"the model process is gone (exit code {self._process.exitcode})") from exc

    def _result(self):
        """The payload of a step's or an embed job's reply; its failure raised (out of memory: the usual OOM)."""
        kind, payload = self._receive()
        if kind == "oom":
            raise torch.OutOfMemoryError(payload)
        if kind == "skipped":
            raise StepSkipped("the step fed tokens of a step that failed")
        if kind == "error":
            raise step_failure(payload)
        return payload

    def _receive(self) -> tuple[str, object]:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            self._process.join(1.0)
            raise ModelProcessError(f"the model process died (exit code {self._process.exitcode})") from exc


def serve_steps(conn) -> None:
    """The model process: wait for the model, build the runner, then run each step sent until "stop" (or until the
    worker goes away). Spawning it imported this module, so torch and transformers are loaded by then."""
    # Signals are the worker's to act on (SIGTERM starts a drain that may still need steps); this process ends
    # when the worker says stop or exits (the pipe closes).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    try:
        kind, setup = conn.recv()
    except EOFError:  # the worker exited (its load failed)
        return
    if kind == "stop":
        return
    model, max_rows = setup["model"], setup["max_rows"]
    torch.set_num_threads(setup["threads"])
    try:
        runner = make_runner(model, num_blocks=setup["num_blocks"], block_size=setup["block_size"],
                             batching=setup["batching"], fast_path=setup["fast_path"],
                             lora_adapters=setup.get("lora_adapters"))
    except ValueError as exc:
        conn.send(("error", str(exc)))
        return
    output = model.get_output_embeddings()  # its weight may be packed by the fast path by now: out_features stays
    width = output.out_features if isinstance(output, torch.nn.Linear) else model.config.vocab_size
    buffers = [torch.empty(max_rows, width, dtype=torch.float32).share_memory_() for _ in range(MAX_STEPS_IN_FLIGHT)]
    paged = isinstance(runner, PagedRunner)
    # Its dropped ranges are this process's addresses: the worker finds the same weights by name in its own copy.
    fast_path = dataclasses.replace(runner.fast_path, dropped_ranges=[]) if paged else fastpath.FastPath(
        skipped="sequential batching")
    conn.send(("ready", {"paged": paged, "logits": buffers, "fast_path": fast_path,
                         "threads": torch.get_num_threads()}))
    freeze_startup_heap()  # the model and the imports: no full collection walks them between steps
    chosen: list[int] | None = []  # the tokens chosen for the last step's rows; None after a failed step
    token_states = TokenStates(width, setup.get("tokenizer"))
    failures = ChoiceFailures()
    steps = 0
    with torch.inference_mode():
        while True:
            try:
                kind, work = conn.recv()
            except EOFError:  # the worker exited
                return
            if kind == "stop":
                return
            try:
                if kind == "embed":
                    conn.send(("embedded", pool_last_tokens(model, work)))
                    continue
                if kind == "lora":
                    conn.send(("lora", _lora_call(runner, *work)))
                    continue
                token_states.forget(work.free)
                failures.forget(work.free)
                if not _feed_previous_tokens(work, chosen):
                    conn.send(("skipped", None))  # the engine drops it: its count seeds are sent again
                    continue
                token_states.seed(work)
                chosen = None
                began = time.perf_counter()
                rows = runner.step(work)
                buffer = steps % len(buffers)
                steps += 1
                buffers[buffer][:len(rows)].copy_(rows)
                seconds = time.perf_counter() - began
                chosen = choose_tokens(buffers[buffer][:len(rows)], work.choices, token_states.rows(work),
                                       failed=failures.of(work))
                conn.send(("ok", (len(rows), buffer, chosen, seconds, work.scores)))
            except torch.OutOfMemoryError as exc:
                conn.send(("oom", str(exc)))
            except Exception:  # the engine dies with this message; the process stays to be stopped
                conn.send(("error", traceback.format_exc(limit=8)))


def _lora_call(runner, action: str, *args) -> str | None:
    """A runtime adapter load or unload on the model process's runner: None, or why the adapter was refused."""
    try:
        getattr(runner, f"{action}_lora")(*args)
    except AdapterError as exc:
        return str(exc)
    return None


def step_failure(child_traceback: str) -> ModelProcessError:
    """The error a failed step fails the engine (and its requests, and their clients) with: the exception's own line;
    the child's traceback goes to the worker's log, not to the clients."""
    log.error("the model process failed:\n%s", child_traceback)
    lines = child_traceback.strip().splitlines()
    return ModelProcessError(f"the model process failed: {lines[-1] if lines else 'no reason given'}")


def _feed_previous_tokens(batch: StepBatch, chosen: list[int] | None) -> bool:
    """Fill in the tokens a step sent ahead feeds from the previous step's rows; False if that step failed."""
    for chunk in batch.chunks:
        if chunk.previous_row is not None:
            if chosen is None:
                return False
            # -1: no token was chosen there (its choice failed): any id will do, the engine drops this chunk (its
            # request took no such token: _still_matches).
            chunk.token_ids = [max(0, chosen[chunk.previous_row])]
    return True


def choose_tokens(logits: torch.Tensor, choices, states: list[TokenState | None] | None = None,
                  failed: Callable[[int, Exception], None] | None = None) -> list[int]:
    """Each row's token as the engine would choose it (Engine._sample_and_commit: greedy rows by one argmax, the
    others by sample_token at their output index, from the same float32 rows); -1 where no token is asked for, or
    where choosing it failed (that request's failure, which the engine reports when it samples the row itself).
    states: per row, the TokenState of a request whose choice reads its tokens (TokenStates.rows), which takes the
    token chosen. failed: told the row and the exception of each choice that failed (ChoiceFailures.of)."""
    if not choices:
        return [-1] * len(logits)
    argmax = logits.argmax(dim=-1).tolist()
    chosen = []
    for row, choice in enumerate(choices):
        row_state = states[row] if states else None
        if choice is None:
            chosen.append(-1)
            continue
        try:
            chosen.append(forced_or(row_state, argmax[row]) if choice[0].raw_argmax
                          else sample_token(logits[row], *choice, row_state))
        except Exception as exc:  # this request's choice alone (arithmetic its parameters overflow): not the step's
            chosen.append(-1)  # the engine samples the row itself and ends that request with the error
            if failed is not None:
                failed(row, exc)
            continue
        if row_state is not None:
            row_state.add(chosen[-1])
    return chosen


class ChoiceFailures:
    """Logs a sequence's failed token choice (choose_tokens), once: the engine ends that request, but a step sent
    ahead may fail its row again. Logged, so that a systematic failure (a bug, not a request's parameters) shows."""

    def __init__(self) -> None:
        self._logged: set[int] = set()

    def of(self, batch: StepBatch) -> Callable[[int, Exception], None]:
        """choose_tokens' `failed` for this batch's logits rows (their sequences looked up only on a failure: this
        runs every step)."""
        return lambda row, exc: self._log([chunk.seq_id for chunk, _ in _row_choices(batch)][row], exc)

    def _log(self, seq_id: int, exc: Exception) -> None:
        if seq_id not in self._logged:
            self._logged.add(seq_id)
            log.warning("choosing a token for sequence %d failed, the worker ends its request: %s: %s", seq_id,
                        type(exc).__name__, exc)

    def forget(self, seq_ids) -> None:
        """Sequences freed: their ids may be given to new requests."""
        self._logged.difference_update(seq_ids)


def _row_choices(batch: StepBatch):
    """(chunk, choice) per logits row (a chunk verifying a speculation has several)."""
    rows = [chunk for chunk in batch.chunks if chunk.want_logits for _ in range(chunk.logits_positions)]
    return zip(rows, batch.choices or [None] * len(rows))


class TokenStates:
    """The TokenStates of requests whose choice reads their tokens (penalized, constrained, thinking) in the model
    process, by sequence id: kept where their tokens are chosen, so such a row is chosen here and its next step sent
    ahead like any other's. Built from the ids the engine sends with a request's first row here
    (StepBatch.state_seeds: new, resumed, migrated in, preempted, or after a token chosen here was not taken),
    updated with each token chosen for it (choose_tokens) and each the engine took without it (StepBatch.state_tokens:
    a speculative commit's), forgotten with its KV state (StepBatch.free: it finished, was preempted or handed
    over)."""

    def __init__(self, vocab_size: int, tokenizer=None) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer  # grammars need it (grammar.grammar_compiler: built at the first)
        self._by_seq: dict[int, TokenState] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._by_seq.pop(seq_id, None)

    def seed(self, batch: StepBatch) -> None:
        """Build the states batch.state_seeds sends (after _feed_previous_tokens: a chunk sent ahead adds the
        token it feeds, which the engine did not know yet), and give the others the tokens batch.state_tokens
        sends."""
        for seq_id, tokens in batch.state_tokens.items():
            state = self._row(seq_id)
            for token in tokens:
                state.add(token)
        for chunk, choice in _row_choices(batch):
            state_seed = batch.state_seeds.get(chunk.seq_id)
            if state_seed is not None and choice is not None:
                fed = chunk.token_ids if chunk.previous_row is not None else []
                params = choice[0]
                self._by_seq[chunk.seq_id] = TokenState.build(
                    params, self.vocab_size, state_seed.prompt_ids, state_seed.output_ids + fed, state_seed.grammar,
                    grammar_compiler(self._tokenizer) if params.constrained else None)

    def rows(self, batch: StepBatch) -> list[TokenState | None]:
        """Per logits row (chunks with want_logits), the state of a row that asks for a token and reads them."""
        return [self._row(chunk.seq_id) if choice is not None and choice[0].reads_tokens else None
                for chunk, choice in _row_choices(batch)]

    def _row(self, seq_id: int) -> TokenState:
        state = self._by_seq.get(seq_id)
        if state is None:
            raise RuntimeError(f"no token state for sequence {seq_id}: the engine sent none")
        return state
