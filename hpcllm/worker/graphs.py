"""Decode steps replayed from CUDA graphs (`[worker] cuda_graphs`): the batch-1..N decode step without its launches.

Why: on a GPU a decode step of a small or mid-size model is bound by kernel launches, not by the GPU. On the H200
machine a batch-1 step of a ~1B Llama launched ~840 kernels for 2.7 ms of GPU work and took ~21 ms
(docs/gpu-checks.md). A CUDA graph records the step's kernels once and replays them with one launch.

A graph replays fixed shapes and fixed addresses, so a decode-only step (every chunk one new token of a sequence
that has a context, every chunk wanting logits) runs here through a *static* step:
- the batch is padded to a bucket of rows (1, 2, 4, 8, ... up to max_rows) and every context to a bucket of
  positions (multiples of CONTEXT_BUCKET tokens): one graph per (rows, positions) pair, captured on first use;
- its inputs live in buffers allocated once per graph (token ids, positions, the new tokens' KV slots, each row's
  context slots, which positions are padding) and are filled before each replay; the logits come out of a buffer
  the graph owns, copied out at once (the next replay overwrites it);
- padded rows and padded positions point at a scratch KV slot one block past the scheduler's blocks (the pool gets
  one more block, allocated in full before the first step so no graph ever sees it move); a padded row attends to
  that slot alone, so its softmax stays finite, and its logits are dropped;
- the attention is the paged runner's own (`_paged_attention`, one decode group holding every row): a replay
  computes what the eager step computes, over more masked positions.

Any other step (a prefill chunk, a mixed step, a batch or context past the largest bucket, more graphs than
MAX_GRAPHS) runs eagerly as before. `mode="eager"` runs the static step without capturing it: what a CPU can check
of this path (tests: greedy == generate through padded buckets); `mode="cuda"` captures (tested where a GPU is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from hpcllm.worker.runner import _active, _DecodeGroup, _StepContext, attention_kernels

log = logging.getLogger(__name__)

CONTEXT_BUCKET = 256  # positions: a context of 1..256 replays the 256-position graph of its row bucket
MAX_GRAPHS = 64  # captured graphs kept (each holds its static buffers; the activations share one memory pool)
MODES = ("cuda", "eager")


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... and max_rows itself: a batch of n rows replays the smallest bucket >= n."""
    buckets, rows = [], 1
    while rows < max_rows:
        buckets.append(rows)
        rows *= 2
    return buckets + [max_rows]


@dataclass
class _StaticStep:
    """One (rows, positions) shape: its input buffers, and once captured its graph and output buffer."""

    rows: int
    positions: int
    input_ids: torch.Tensor  # [1, rows]
    position_ids: torch.Tensor  # [1, rows]
    write_slots: torch.Tensor  # [rows]
    read_slots: torch.Tensor  # [rows, positions]
    padding: torch.Tensor  # [rows, 1, 1, positions] True = padding (the runner builds its additive mask from it)
    row_index: torch.Tensor  # [rows] 0..rows-1: the rows of the packed input and of the kept logits
    graph: object | None = None
    logits: torch.Tensor | None = None  # the captured step's output: [rows, vocab]
    replays: int = 0
    host: dict = field(default_factory=dict)  # CPU staging of the inputs, filled per step


def kv_pool_bytes(config, dtype: torch.dtype, slots: int) -> int | None:
    """Bytes of a KV pool of `slots` positions for a model of `config` (None when the config does not say)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers * 2 * kv_heads * head_dim * slots * dtype.itemsize


def _check_kv_pool_fits(runner) -> None:
    """With graphs the whole KV pool is allocated before the first step (the eager runner grows it as used): refuse
    a budget the GPU cannot hold now, with what to set, rather than fail at the first step."""
    model = runner.model
    dtype = model.get_input_embeddings().weight.dtype
    needed = kv_pool_bytes(model.config, dtype, (runner.pool.max_blocks + 1) * runner.block_size)
    free, _ = torch.cuda.mem_get_info(runner.device)
    if needed is not None and needed > 0.9 * free:
        raise ValueError(f"cuda_graphs allocates the whole KV cache before the first step: {needed / 1e9:.1f} GB for "
                         f"{runner.pool.max_blocks * runner.block_size} tokens, with {free / 1e9:.1f} GB free on "
                         f"{runner.device}; set [worker] kv_cache_tokens lower (or max_running_requests / "
                         f"max_model_len)")


class DecodeGraphs:
    """The static decode step of a PagedRunner, captured into CUDA graphs (mode "cuda") or run as is ("eager")."""

    def __init__(self, runner, *, max_rows: int, max_context: int, mode: str = "cuda") -> None:
        if mode not in MODES:
            raise ValueError(f"decode graph mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "cuda" and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {runner.device}")
        self.runner = runner
        self.mode = mode
        if mode == "cuda":
            _check_kv_pool_fits(runner)
        self.buckets = row_buckets(max_rows)
        self.max_positions = -(-max_context // CONTEXT_BUCKET) * CONTEXT_BUCKET
        block_size = runner.block_size
        self.scratch_slot = runner.pool.max_blocks * block_size  # the extra block's first slot
        runner.pool.max_blocks += 1
        runner.pool.reserve(runner.pool.max_blocks)  # the whole pool at the first step: addresses never change
        self.steps: dict[tuple[int, int], _StaticStep] = {}
        self.memory_pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.captures = 0
        self.eager_steps = 0  # decode-only steps that did not fit a graph (past the buckets or MAX_GRAPHS)
        self.disabled: str | None = None  # why graphs stopped (a capture failed): every step runs eagerly then

    def summary(self) -> dict:
        """What /ready reports: graphs captured (or static shapes in eager mode), decode steps that ran eagerly, and
        why graphs stopped if a capture failed."""
        return {"mode": self.mode, "shapes": len(self.steps), "captured": self.captures,
                "eager_decode_steps": self.eager_steps, "disabled": self.disabled}

    def shape_for(self, rows: int, longest: int) -> tuple[int, int] | None:
        """The (rows, positions) bucket of a decode-only step, or None when none fits."""
        bucket = next((b for b in self.buckets if b >= rows), None)
        positions = -(-longest // CONTEXT_BUCKET) * CONTEXT_BUCKET
        if bucket is None or positions > self.max_positions:
            return None
        return bucket, positions

    def step(self, chunks) -> torch.Tensor | None:
        """The logits of a decode-only step ([len(chunks), vocab]), or None: run it eagerly."""
        if self.disabled or not chunks or not all(len(c.token_ids) == 1 and c.start > 0 and c.want_logits
                                                  for c in chunks):
            return None
        shape = self.shape_for(len(chunks), max(c.start + 1 for c in chunks))
        static = None if shape is None else self.steps.get(shape)
        if shape is not None and static is None and len(self.steps) < MAX_GRAPHS:
            static = self.steps[shape] = self._buffers(*shape)
        if static is None:
            self.eager_steps += 1
            return None
        self._fill(static, chunks)
        if self.mode == "eager":
            logits = self._run(static)
        else:
            if static.graph is None and not self._capture(static):
                return None
            static.graph.replay()
            logits = static.logits
        static.replays += 1
        return logits[: len(chunks)].clone()  # the next replay overwrites the graph's output

    # ---- static buffers ----------------------------------------------------------------------------------------

    def _buffers(self, rows: int, positions: int) -> _StaticStep:
        device = self.runner.device
        long = {"dtype": torch.long, "device": device}
        pin = device.type == "cuda"
        return _StaticStep(
            rows=rows, positions=positions,
            input_ids=torch.zeros(1, rows, **long), position_ids=torch.zeros(1, rows, **long),
            write_slots=torch.zeros(rows, **long), read_slots=torch.zeros(rows, positions, **long),
            padding=torch.zeros(rows, 1, 1, positions, dtype=torch.bool, device=device),
            row_index=torch.arange(rows, **long),
            host={"ids": torch.zeros(2, rows, dtype=torch.long, pin_memory=pin),
                  "slots": torch.zeros(rows, positions + 1, dtype=torch.long, pin_memory=pin),
                  "padding": torch.zeros(rows, positions, dtype=torch.bool, pin_memory=pin)},
        )

    def _fill(self, static: _StaticStep, chunks) -> None:
        """Write this step's tokens, positions, slots and padding into the static buffers (padded: the scratch slot).
        A few tensor operations for the whole batch, whatever its rows: this runs on the CPU before every replay."""
        size, scratch, count = self.runner.block_size, self.scratch_slot, len(chunks)
        contexts = [c.start + 1 for c in chunks]
        tables = [c.block_table[: -(-context // size)] for c, context in zip(chunks, contexts)]
        width = -(-static.positions // size)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        slots = (table[:, :, None] * size + torch.arange(size)).reshape(count, -1)[:, :static.positions]
        context = torch.tensor(contexts, dtype=torch.long)
        valid = torch.arange(static.positions)[None, :] < context[:, None]
        ids, host_slots, padding = static.host["ids"], static.host["slots"], static.host["padding"]
        ids.zero_()
        ids[0, :count] = torch.tensor([c.token_ids[0] for c in chunks], dtype=torch.long)
        ids[1, :count] = context - 1
        host_slots.fill_(scratch)
        host_slots[:count, 0] = slots.gather(1, (context - 1)[:, None])[:, 0]  # where the new keys/values go
        host_slots[:count, 1:] = torch.where(valid, slots, scratch)
        padding.zero_()  # a padded row attends to the scratch slot everywhere: finite, and dropped
        padding[:count] = ~valid
        non_blocking = static.input_ids.device.type == "cuda"
        static.input_ids[0].copy_(ids[0], non_blocking=non_blocking)
        static.position_ids[0].copy_(ids[1], non_blocking=non_blocking)
        static.write_slots.copy_(host_slots[:, 0], non_blocking=non_blocking)
        static.read_slots.copy_(host_slots[:, 1:], non_blocking=non_blocking)
        static.padding[:, 0, 0].copy_(padding, non_blocking=non_blocking)

    # ---- running and capturing ---------------------------------------------------------------------------------

    def _run(self, static: _StaticStep) -> torch.Tensor:
        """The step's forward over the static buffers: what a graph records and replays."""
        # The group is made here, so its additive mask is built from the static padding inside every replay.
        group = _DecodeGroup(0, static.rows, 0, static.positions, static.padding)
        _active.step = _StepContext(self.runner.pool, static.write_slots, [], [group], static.read_slots.view(-1))
        try:
            with attention_kernels(self.runner.device):
                out = self.runner.model(input_ids=static.input_ids, position_ids=static.position_ids,
                                        use_cache=False, logits_to_keep=static.row_index)
        finally:
            _active.step = None
        return out.logits[0]

    def _capture(self, static: _StaticStep) -> bool:
        """Warm the step up on a side stream (lazy initialisations must not happen inside the capture), then record
        it. The inputs already hold this step's values, so the warm-up writes the same keys/values the replay will.
        A failure (an operation a capture forbids, no memory) turns graphs off for this engine: it goes on eagerly,
        which recomputes this step from the same inputs."""
        try:
            current = torch.cuda.current_stream(self.runner.device)
            side = torch.cuda.Stream(device=self.runner.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(static)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.memory_pool):
                static.logits = self._run(static)
        except Exception as exc:  # noqa: BLE001 - the engine serves on without graphs; the log says why
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.exception("capturing the decode step for %d rows x %d positions failed; decode steps run eagerly "
                          "from now on", static.rows, static.positions)
            return False
        static.graph = graph
        self.captures += 1
        log.info("captured the decode step for %d rows x %d positions (%d graphs)", static.rows, static.positions,
                 self.captures)
        return True
