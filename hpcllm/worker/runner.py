"""Model execution of one engine step, behind one small seam: `ModelRunner.step(StepBatch) -> logits`.

The scheduler (engine.py) decides what runs; a runner only executes it. A StepBatch is plain data (ints and lists),
picklable, so a tensor-parallel follower rank can receive rank 0's StepBatch by MPI broadcast and call its own
runner with it: every rank then writes the same KV blocks and computes its shard of the same forward.

Two runners:

- `PagedRunner` (the default): ONE forward per step over every scheduled sequence. The sequences' new tokens are
  packed into a single row (no padding), each at its own positions. A custom attention function (registered through
  transformers' AttentionInterface) writes each sequence's new keys/values into a pool of fixed-size KV blocks at
  the slots its block table names (one copy for all), gathers each sequence's whole context back from the pool, and
  runs transformers' own SDPA attention on it: a prefill chunk alone, the decodes (one new token each) and
  speculative verifications (a few tokens each) in groups of similar context and chunk length, one SDPA call per
  group over contexts padded to the group's longest with the padding masked out (the padding allowance bounds the
  padding on CPU; on a GPU all share one call). Attention
  sees exactly the keys/values a batch-of-one run would; greedy output equals `generate` whatever else is in the
  batch (test_batching.py; on CUDA, flash / memory-efficient kernels only: attention_kernels). Block
  tables come from the scheduler (kvcache.BlockPool), so the runner holds no per-sequence state. On CPU it first
  applies fastpath.prepare to the model (fused q/k/v and gate/up, oneDNN-packed linears).
- `SequentialRunner`: the previous design, one forward per sequence with its own transformers DynamicCache. It
  serves models whose attention the paged runner cannot express (sliding windows, non-SDPA attention) and is the
  benchmark baseline (`batching="sequential"`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from hpcllm.checkpoint.heads import classifier_architecture
from hpcllm.worker import cpumem, fastpath, lora
from hpcllm.worker.lora_config import AdapterConfig
from hpcllm.worker.sampling import SamplingParams

PAGED_ATTENTION = "hpcllm_paged"
# Decodes of similar context length share one attention call; a group's padded positions may exceed the positions
# it holds by this factor (padding costs gather bandwidth, each extra group a call). 1.2: at 64 decoding requests
# (bench/decode_step.py, alternating) attention took 15-20 ms per step against 19-23 ms at 1.5 and 26-30 ms at 2.0;
# 1.05-1.1 was no better than 1.2 (more calls); at 16 requests no difference showed.
CPU_PADDING_ALLOWANCE = 1.2
# On a GPU the padded gather is cheap and each extra call costs its kernel launches: every decode in one call per
# layer was 1.5x the output tokens/s of 1.2 at 16 requests and 1.16x at 64 (H200, ~1B bf16 Llama, one run each,
# bench/engine_gpu.py --padding-allowance).
GPU_PADDING_ALLOWANCE = math.inf
# Chunks after cached tokens of at most this many tokens (decodes, speculative verifications: the last token and up
# to speculative_ngram_tokens proposed) are attended in the decodes' grouped calls; longer ones (prefill chunks) each
# in its own call.
MAX_GROUPED_TOKENS = 16


def padding_allowance_for(device: torch.device) -> float:
    return CPU_PADDING_ALLOWANCE if device.type == "cpu" else GPU_PADDING_ALLOWANCE


@dataclass
class SequenceChunk:
    """One sequence's part of a step: feed token_ids at positions start, start+1, ...

    block_table lists the KV blocks holding positions 0.. of this sequence (block i holds positions
    i*block_size .. (i+1)*block_size-1); it covers at least start + len(token_ids) positions.
    want_logits: return the logits of the chunk's last position (it reached the last known token); with
    logits_positions > 1, of its last logits_positions positions, one row each (speculative verification)."""

    seq_id: int
    token_ids: list[int]
    start: int
    block_table: list[int] = field(default_factory=list)
    want_logits: bool = True
    # A step sent to the model process while the previous one still ran (the engine's asynchronous scheduling):
    # this chunk's one token is the one the model process chose for this logits row of the previous step, filled
    # in there before the step runs (token_ids holds a placeholder until then).
    previous_row: int | None = None
    # Prompt log probabilities (GenerateRequest.prompt_logprobs): the chunk's positions from its first one are
    # scored against these ids (each position's logits against the token after it), with score_top alternatives.
    score_ids: list[int] = field(default_factory=list)
    score_top: int = 0
    logits_positions: int = 1
    lora: tuple[str, str] | None = None  # its LoRA adapter (name, folder), lora.py; None: the base model


class StateSeed(NamedTuple):
    """What the model process builds a request's TokenState from, sent once (not with every step's choices)."""

    prompt_ids: list[int]  # a penalized request's (TokenCounts); [] for others, which never read them
    output_ids: list[int]  # known at launch (a chunk with previous_row adds the token it feeds)
    grammar: str | None  # a constrained request's (GenerateRequest.grammar)


@dataclass
class StepBatch:
    """One engine step: the chunks to run, and sequences whose KV state the runner may forget (finished,
    preempted) before it runs them. Logits come back in chunk order, logits_positions rows per chunk with
    want_logits."""

    chunks: list[SequenceChunk]
    free: list[int] = field(default_factory=list)
    # For a model process (runner_process.py), per logits row: how the engine would choose that row's token
    # (sampling params, output index), for the model process to choose it the same way; None: no token wanted.
    choices: list[tuple[SamplingParams, int] | None] | None = None
    # Penalized, constrained or thinking sequences whose TokenState the model process builds before choosing this
    # step's tokens (their first row there, or their state there went stale): seq id -> StateSeed.
    # runner_process.TokenStates.
    state_seeds: dict[int, StateSeed] = field(default_factory=dict)
    # Sequences whose TokenState there lacks output ids the engine took without it (a speculative commit's): seq id ->
    # those ids, taken before this step's tokens are chosen.
    state_tokens: dict[int, list[int]] = field(default_factory=dict)
    # Filled in by the runner: per chunk with score_ids, its positions' scores (a few numbers each, never whole
    # vocabulary rows: they cross the model process's pipe).
    scores: dict[int, "PositionScores"] = field(default_factory=dict)


@dataclass
class PositionScores:
    """Per scored position: the log probability of the token after it, and the top most likely tokens' ids and log
    probabilities (of the raw distribution, float32)."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    ranks: list[int]  # of the token after each position: how many tokens are at least as likely (vLLM's rank)


def score_positions(logits: torch.Tensor, targets: list[int], top: int) -> PositionScores:
    """Scores of [positions, vocab] logits against the token after each position (float32 log_softmax, as the
    engine's generated-token logprobs)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1))[:, 0]
    best = torch.topk(logprobs, top) if top else None
    ranks = (logprobs >= chosen.unsqueeze(1)).sum(dim=1)
    return PositionScores(chosen.tolist(), best.indices.tolist() if best is not None else [[] for _ in targets],
                          best.values.tolist() if best is not None else [[] for _ in targets], ranks.tolist())


class ModelRunner(Protocol):
    block_size: int

    def step(self, batch: StepBatch) -> torch.Tensor:
        """Run the batch's forward; a [rows, vocab] tensor (rows = chunks with want_logits, in order)."""


def paged_attention_supported(model) -> str | None:
    """None if PagedRunner can serve this model, else why not (the engine then falls back to SequentialRunner)."""
    config = model.config
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take custom attention functions"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", PAGED_ATTENTION):
        return f"the model runs {config._attn_implementation!r} attention, not sdpa"
    if not full_attention_only(config):
        return "the model has sliding-window or other non-full attention layers"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    return None


def full_attention_only(config) -> bool:
    """Whether every layer attends to the whole context: no sliding window, chunked or linear attention, whose cache
    layers drop old positions themselves (so that they cannot be cut back to an earlier length either)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    return not (any(t != "full_attention" for t in layer_types)
                or (window is not None and getattr(config, "use_sliding_window", True))
                or getattr(config, "attention_chunk_size", None) is not None)


# ---- the paged attention function -----------------------------------------------------------------------------

_active = threading.local()  # the step a PagedRunner is running on this thread (None: plain sdpa)


@dataclass
class _SequenceView:
    begin: int  # range of this sequence's tokens in the packed row
    end: int
    read_slots: torch.Tensor  # pool slots of positions 0..context-1
    mask: torch.Tensor | None  # causal mask with an offset (a chunk after cached tokens); None: plain causal/decode


@dataclass
class _DecodeGroup:
    """Short chunks after cached tokens (decodes: one new token; speculative verifications: the last token and the
    proposal) with similar contexts and lengths, attended in ONE SDPA call over their contexts padded to the group's
    longest and, when a chunk has several tokens, their queries padded to the group's longest chunk. The runner
    packs these chunks first, sorted by (tokens, context), so a group is a range of the packed row and its context
    slots a range of the step's decode_slots."""

    begin: int  # its tokens in the packed row: begin..end-1
    end: int
    offset: int  # its slots in the step's decode_slots: rows x longest from here, row by row
    longest: int
    # [rows, 1, queries, longest], True = not attended: a context's padding, and in a chunk of several tokens the
    # positions after each token (query j of a chunk sees its context up to its own position); None: all attended.
    padding: torch.Tensor | None
    queries: int = 1  # the group's longest chunk: every row's queries are padded to this many
    # With queries > 1: per row and padded query, the chunk token it is (group-relative; a padded query repeats the
    # row's last token, so its softmax is finite, and is dropped), and which padded queries are the chunks' tokens.
    query_index: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)  # (dtype, heads per kv head) -> additive mask, built once per step

    @property
    def rows(self) -> int:
        return self.end - self.begin if self.query_index is None else self.query_index.shape[0] // self.queries

    def mask(self, dtype: torch.dtype, heads_per_kv: int = 1) -> torch.Tensor | None:
        """The padding as an additive mask (0 attend, -inf not), over the query layout of _decode_attention
        ([rows, 1, heads_per_kv * queries, longest] when queries > 1): what SDPA would convert a boolean mask to in
        every layer's call, built once per step."""
        if self.padding is None:
            return None
        key = (dtype, heads_per_kv if self.queries > 1 else 1)
        mask = self._masks.get(key)
        if mask is None:
            blocked = self.padding
            if self.queries > 1:  # the same mask for every query head of a key/value head
                blocked = blocked.unsqueeze(2).expand(-1, -1, heads_per_kv, -1, -1).reshape(
                    self.rows, 1, heads_per_kv * self.queries, self.longest)
            mask = self._masks[key] = torch.zeros(blocked.shape, dtype=dtype,
                                                  device=blocked.device).masked_fill_(blocked, float("-inf"))
        return mask


@dataclass
class _StepContext:
    pool: "KVPool"
    write_slots: torch.Tensor  # pool slots of every new token, in packed order
    sequences: list[_SequenceView]  # attended one by one: prefill chunks
    decode_groups: list[_DecodeGroup] = field(default_factory=list)
    decode_slots: torch.Tensor | None = None  # every group's context slots, one flat tensor: one gather per layer


def _paged_attention(module, query, key, value, attention_mask, **kwargs):
    step: _StepContext | None = getattr(_active, "step", None)
    if step is None:  # the model used outside an engine step (e.g. generate): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    k_pool, v_pool = step.pool.layer(module.layer_idx, key)
    k_pool.index_copy_(1, step.write_slots, key[0])  # every sequence's new keys/values, one copy each
    v_pool.index_copy_(1, step.write_slots, value[0])
    heads, tokens = query.shape[1], query.shape[2]
    output = query.new_empty(1, tokens, heads, value.shape[3])  # sdpa_attention_forward's [batch, q, heads, dim]
    for seq in step.sequences:
        keys = k_pool.index_select(1, seq.read_slots).unsqueeze(0)
        values = v_pool.index_select(1, seq.read_slots).unsqueeze(0)
        out, _ = sdpa_attention_forward(module, query[:, :, seq.begin:seq.end], keys, values, seq.mask, **kwargs)
        output[:, seq.begin:seq.end] = out
    if step.decode_groups:
        _decode_attention(step, query[0], k_pool, v_pool, output[0], kwargs.get("scaling"))
    return output, None


def _decode_attention(step: _StepContext, query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      output: torch.Tensor, scaling: float | None) -> None:
    """The step's short chunks (decodes, verifications), a group per SDPA call, into output ([tokens, heads, dim];
    query [heads, tokens, dim]).

    Every group's keys and values come from one gather per pool, and each group's rows are a slice of the packed
    row. The query heads that share a key/value head are that head's queries (transformers' pack_gqa: [rows,
    kv_heads, heads per kv head x queries, dim]), so grouped-query attention needs no repeated keys. A group of
    one-token chunks is views only; a group with longer chunks gathers its queries into that layout (padded per row
    to the group's longest chunk) and its outputs back."""
    kv_heads, head_dim = k_pool.shape[0], k_pool.shape[2]
    heads = query.shape[0]
    per_kv = heads // kv_heads
    keys_all, values_all = step.pool.gather(k_pool, v_pool, step.decode_slots)
    for group in step.decode_groups:
        rows, longest, queries = group.rows, group.longest, group.queries
        span = slice(group.offset, group.offset + rows * longest)
        keys = keys_all[:, span].view(kv_heads, rows, longest, head_dim).transpose(0, 1)
        values = values_all[:, span].view(kv_heads, rows, longest, -1).transpose(0, 1)
        tokens = query[:, group.begin:group.end]
        if queries == 1:
            packed = tokens.transpose(0, 1).reshape(rows, kv_heads, per_kv, head_dim)
        else:  # [heads, rows x queries, dim] -> [rows, kv_heads, per_kv x queries, dim]
            packed = tokens.index_select(1, group.query_index).view(kv_heads, per_kv, rows, queries, head_dim)
            packed = packed.permute(2, 0, 1, 3, 4).reshape(rows, kv_heads, per_kv * queries, head_dim)
        out = torch.nn.functional.scaled_dot_product_attention(packed, keys, values,
                                                               attn_mask=group.mask(query.dtype, per_kv), scale=scaling)
        if queries == 1:
            output[group.begin:group.end] = out.view(rows, heads, -1)
        else:
            out = out.view(rows, kv_heads, per_kv, queries, -1).permute(0, 3, 1, 2, 4)
            out = out.reshape(rows * queries, heads, -1)
            output[group.begin:group.end] = out.index_select(0, group.kept)


def _paged_mask(*args, **kwargs):
    if getattr(_active, "step", None) is None:
        return sdpa_mask(*args, **kwargs)
    return None  # each sequence's mask is built in _paged_attention


AttentionInterface.register(PAGED_ATTENTION, _paged_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PAGED_ATTENTION, _paged_mask)


# On CUDA, SDPA may pick cuDNN's attention, which builds an execution plan per distinct shape: ~1.7 ms of CPU per
# call against ~4 us of GPU work (H200, torch 2.11, bench/engine_gpu.py --profile). A decode's context grows by one
# every step, so every call of every layer was a new shape: 65 ms per token at batch 1 where generate took 15.
# Flash and memory-efficient attention have no per-shape planning.
_CUDA_ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(device: torch.device):
    """The SDPA kernels a step may use on `device` (a context manager; nothing changes on CPU)."""
    return sdpa_kernel(_CUDA_ATTENTION_KERNELS) if device.type == "cuda" else contextlib.nullcontext()


class KVPool:
    """Per layer, keys and values of every block: [kv_heads, num_blocks * block_size, head_dim] tensors.

    Allocated on first use (shapes come from the model's own key states) and grown by doubling up to max_blocks as
    higher block ids are used, so a large budget costs memory only when it is used. The scheduler hands out low
    block ids first."""

    def __init__(self, max_blocks: int, block_size: int) -> None:
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.capacity_blocks = 0
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # gather(): CPU buffers for keys, values
        self.keep_gather_buffers = True  # False: a fresh tensor per gather (bench/decode_step.py's baseline)

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._layers.get(layer_idx)
        slots = self.capacity_blocks * self.block_size
        if pair is None or pair[0].shape[1] < slots:
            shape = (like.shape[1], slots, like.shape[3])
            grown = (like.new_zeros(shape), like.new_zeros(shape))
            if pair is not None:
                grown[0][:, : pair[0].shape[1]].copy_(pair[0])
                grown[1][:, : pair[1].shape[1]].copy_(pair[1])
            self._layers[layer_idx] = pair = grown
        return pair

    def gather(self, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A layer's keys and values at `slots` ([kv_heads, len(slots), head_dim] each). On CPU into two buffers kept
        across layers and steps: a gather of several MB per layer into a fresh tensor is a fresh allocation that
        glibc may map anew and the copy then faults in page by page. On a GPU the caching allocator keeps its memory
        anyway, and a captured graph must not see a buffer that a later, larger step replaces."""
        if k_pool.device.type != "cpu" or not self.keep_gather_buffers:
            return k_pool.index_select(1, slots), v_pool.index_select(1, slots)
        shape = (k_pool.shape[0], slots.shape[0], k_pool.shape[2])
        needed = shape[0] * shape[1] * shape[2]
        if self._gathered is None or self._gathered[0].numel() < needed or self._gathered[0].dtype != k_pool.dtype:
            self._gathered = tuple(torch.empty(needed + needed // 2, dtype=k_pool.dtype) for _ in range(2))
        k_out, v_out = (buffer[:needed].view(shape) for buffer in self._gathered)
        return torch.index_select(k_pool, 1, slots, out=k_out), torch.index_select(v_pool, 1, slots, out=v_out)

    def reserve(self, needed_blocks: int) -> None:
        if needed_blocks > self.capacity_blocks:
            self.capacity_blocks = min(self.max_blocks, max(needed_blocks, 2 * self.capacity_blocks, 16))


class PagedRunner:
    # Whether step() scores score_ids (prompt logprobs); a tensor-parallel follower's runner runs the lead's batch
    # (the same forward rows, for the collectives) but its scores would be discarded: a vocabulary-wide
    # log-softmax per prompt position, wasted, and a common out-of-memory spot on long prompts.
    keeps_scores = True

    def __init__(self, model, *, num_blocks: int, block_size: int, fast_path: bool = True,
                 lora_adapters: dict[str, str] | None = None) -> None:
        """fast_path: fuse q/k/v and gate/up and pack the linears for oneDNN on CPU (fastpath.py; changes `model`
        in place). lora_adapters: name -> PEFT folder, read and installed on the model's linear layers (lora.py)."""
        self.model = model
        self.block_size = block_size
        self.pool = KVPool(num_blocks, block_size)
        self.device = model.get_input_embeddings().weight.device
        self.padding_allowance = padding_allowance_for(self.device)
        self.max_grouped_tokens = MAX_GROUPED_TOKENS  # 1: verifications attended one by one (tests' reference)
        self.use_fast_path = fast_path  # tensor-parallel followers build their runners with the lead's options
        self.decode_graphs = None  # graphs.DecodeGraphs: decode-only steps replayed from CUDA graphs (Engine sets it)
        if self.device.type == "cpu":
            cpumem.keep_freed_memory()  # this process steps a CPU model: its activations stay mapped between steps
        self.fast_path = fastpath.prepare(model) if fast_path else fastpath.FastPath(skipped="turned off")
        self.lean_step = None  # fastpath.LeanStep: the fused model's step without transformers' module calls
        if self.fast_path.skipped is None:
            self.lean_step, self.fast_path.lean_step = fastpath.lean_step(model, _paged_attention)
        # After the fast path: an adapter of q_proj (gate_proj...) adds its delta to that slice of the fused layer.
        self.lora = lora.LoraLayers(model, lora_adapters) if lora_adapters else None
        model.config._attn_implementation = PAGED_ATTENTION
        for module in model.modules():  # some models cache the implementation per sub-config
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = PAGED_ATTENTION

    def step(self, batch: StepBatch) -> torch.Tensor:
        scored = [index for index, chunk in enumerate(batch.chunks) if chunk.score_ids]
        if self.decode_graphs is not None and not scored:
            logits = self.decode_graphs.step(batch.chunks)
            if logits is not None:
                return logits
        size = self.block_size
        short: list[tuple[int, int, int]] = []  # (tokens, context, chunk index) of decodes and verifications
        prefills: list[int] = []  # chunk indices
        highest_block = 0
        for index, chunk in enumerate(batch.chunks):
            context = chunk.start + len(chunk.token_ids)
            highest_block = max(highest_block, max(chunk.block_table[: -(-context // size)]) + 1)
            if chunk.start > 0 and len(chunk.token_ids) <= self.max_grouped_tokens:
                short.append((len(chunk.token_ids), context, index))
            else:
                prefills.append(index)
        # Short chunks first, sorted by (tokens, context): a decode group is then a range of the packed row.
        short.sort()
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []  # pool slots of every new token, in packed order
        last_row = [0] * len(batch.chunks)  # each chunk's last position in the packed row
        first_row = [0] * len(batch.chunks)
        sequences: list[_SequenceView] = []
        adapter_rows: list[tuple[tuple[str, str], int, int]] = []  # (adapter, begin, end) of each chunk with one
        for order, index in enumerate([index for *_, index in short] + prefills):
            chunk = batch.chunks[index]
            begin, context = len(ids), chunk.start + len(chunk.token_ids)
            first_row[index] = begin
            ids.extend(chunk.token_ids)
            if chunk.lora is not None:
                adapter_rows.append((chunk.lora, begin, len(ids)))
            positions.extend(range(chunk.start, context))
            # The new tokens' slots as plain Python ints (one tensor per step below); a context's slots are only
            # ever built from its blocks as a tensor (_context_slots), never position by position in Python.
            table = chunk.block_table
            write_slots.extend(table[p // size] * size + p % size for p in range(chunk.start, context))
            last_row[index] = len(ids) - 1
            if order >= len(short):  # a prefill chunk, attended on its own
                sequences.append(_SequenceView(begin, len(ids), self._context_slots([table], context)[0],
                                               self._mask(chunk, len(ids) - begin)))
        keep = [row for index, chunk in enumerate(batch.chunks) if chunk.want_logits
                for row in range(last_row[index] - chunk.logits_positions + 1, last_row[index] + 1)]
        rows = len(keep)
        for index in scored:  # only a scored chunk keeps more than its last position's logits
            keep.extend(range(first_row[index], first_row[index] + len(batch.chunks[index].score_ids)))
        self.pool.reserve(highest_block)
        groups, decode_slots = self._decode_groups([(tokens, context, batch.chunks[index].block_table)
                                                    for tokens, context, index in short])
        _active.step = _StepContext(self.pool, torch.tensor(write_slots, device=self.device), sequences, groups,
                                    decode_slots)
        input_ids = torch.tensor([ids], device=self.device)
        position_ids = torch.tensor([positions], device=self.device)
        keep_rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        try:
            with self._adapters(adapter_rows):
                logits = self._forward(input_ids, position_ids, keep_rows)
        finally:
            _active.step = None
        if scored and self.keeps_scores:
            _keep_scores(batch, scored, logits[rows:])
        return logits[:rows]

    def load_lora(self, name: str, folder: str, config: AdapterConfig) -> None:
        """Install an adapter at runtime (the engine calls it between steps, with the config its load_lora read)."""
        if self.lora is None:
            self.lora = lora.LoraLayers(self.model, {})
        self.lora.add(name, folder, config)

    def unload_lora(self, name: str, folder: str) -> None:
        if self.lora is not None:
            self.lora.remove(name, folder)

    def _adapters(self, adapter_rows: list[tuple[tuple[str, str], int, int]]):
        """The step's LoRA row groups (a context manager; nothing when no chunk runs with an adapter)."""
        if not adapter_rows:
            return contextlib.nullcontext()
        known = self.lora.keys if self.lora is not None else []
        unknown = sorted({key for key, _, _ in adapter_rows} - set(known))
        if unknown:
            raise ValueError(f"LoRA adapter(s) {_keys(unknown)} not loaded (loaded: {_keys(known) or 'none'})")
        return self.lora.rows(adapter_rows, self.device)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
        if self.lean_step is not None:
            return self.lean_step(input_ids, position_ids, keep_rows)
        with attention_kernels(self.device):
            return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                              logits_to_keep=keep_rows).logits[0]

    def _decode_groups(self, short: list[tuple[int, int, list[int]]]
                       ) -> tuple[list[_DecodeGroup], torch.Tensor | None]:
        """Batch the attention of the short chunks: (tokens, context, block table), sorted and packed in this order,
        split into groups whose padded work (rows x longest chunk x longest context) is at most padding_allowance
        times the work they hold (tokens x context per row), each attended in one SDPA call; and all groups'
        context slots in one tensor."""
        ranges: list[tuple[int, int]] = []  # [begin, end) in short
        held = longest = 0
        for row, (tokens, length, _) in enumerate(short):
            begin = ranges[-1][0] if ranges else 0
            # Sorted by tokens: this row's are the most so far in its group; its context may be shorter.
            padded = (row - begin + 1) * tokens * max(longest, length)
            if ranges and padded <= self.padding_allowance * (held + tokens * length):
                ranges[-1] = (begin, row + 1)
                held, longest = held + tokens * length, max(longest, length)
            else:
                ranges.append((row, row + 1))
                held, longest = tokens * length, length
        groups, slots, offset, token = [], [], 0, 0
        for begin, end in ranges:
            members = short[begin:end]
            rows, queries = end - begin, members[-1][0]
            longest = max(length for _, length, _ in members)
            counts = [tokens for tokens, _, _ in members]
            slots.append(self._context_slots([table for _, _, table in members], longest).reshape(-1))
            group = _DecodeGroup(token, token + sum(counts), offset, longest, None, queries)
            if queries > 1:
                self._query_layout(group, counts)
            lengths = [length for _, length, _ in members]
            if queries > 1 or min(lengths) != longest:
                group.padding = self._blocked(counts, lengths, queries, longest)
            groups.append(group)
            offset += rows * longest
            token = group.end
        return groups, torch.cat(slots) if slots else None

    def _query_layout(self, group: _DecodeGroup, counts: list[int]) -> None:
        """A group's padded queries: per row, its chunk's tokens then its last token repeated up to group.queries."""
        index, kept, first = [], [], 0
        for row, count in enumerate(counts):
            index.extend(first + min(j, count - 1) for j in range(group.queries))
            kept.extend(row * group.queries + j for j in range(count))
            first += count
        group.query_index = torch.tensor(index, device=self.device)
        group.kept = torch.tensor(kept, device=self.device)

    def _blocked(self, counts: list[int], lengths: list[int], queries: int, longest: int) -> torch.Tensor:
        """[rows, 1, queries, longest]: True where a row's padded query j must not attend (query j of a chunk of
        `count` tokens ending at context `length` sees positions < length - count + j + 1; a padded query as its
        chunk's last token)."""
        if queries == 1:  # decodes only (the common step): a row sees its context, 3 ops and one copy
            ends = torch.tensor(lengths, device=self.device)
            return (torch.arange(longest, device=self.device)[None] >= ends[:, None])[:, None, None]
        count = torch.tensor(counts, device=self.device)[:, None]
        j = torch.minimum(torch.arange(queries, device=self.device)[None], count - 1)
        sees = torch.tensor(lengths, device=self.device)[:, None] - count + j + 1  # [rows, queries]
        return (torch.arange(longest, device=self.device)[None, None] >= sees[:, :, None])[:, None]

    def _context_slots(self, block_tables: list[list[int]], length: int) -> torch.Tensor:
        """[sequences, length] pool slots of positions 0..length-1 of each block table. A shorter table is padded
        with block 0: the positions past a sequence's own context are masked out (their values, whatever they are,
        weigh exactly 0)."""
        blocks = -(-length // self.block_size)
        table = torch.tensor([t[:blocks] + [0] * (blocks - len(t[:blocks])) for t in block_tables], device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        slots = (table.unsqueeze(-1) * self.block_size + offsets).reshape(len(block_tables), -1)
        return slots[:, :length].contiguous()  # contiguous: every layer's gather takes it as it is

    def _mask(self, chunk: SequenceChunk, length: int) -> torch.Tensor | None:
        context = chunk.start + length
        if length == 1 or chunk.start == 0:
            return None  # decode, or a first chunk: SDPA's own causal path, exactly as generate runs it
        rows = torch.arange(length, device=self.device).unsqueeze(1) + chunk.start
        return (torch.arange(context, device=self.device).unsqueeze(0) <= rows)[None, None]


def _keep_scores(batch: StepBatch, scored: list[int], rows: torch.Tensor) -> None:
    """batch.scores of the scored chunks, whose positions' logits are `rows`, chunk after chunk."""
    at = 0
    for index in scored:
        chunk = batch.chunks[index]
        count = len(chunk.score_ids)
        batch.scores[chunk.seq_id] = score_positions(rows[at:at + count], chunk.score_ids, chunk.score_top)
        at += count


def _keys(keys: list[tuple[str, str]]) -> str:
    return ", ".join(f"{name} ({folder})" for name, folder in keys)


class SequentialRunner:
    """One forward per chunk, each sequence with its own DynamicCache (the engine's design before batching)."""

    keeps_scores = True  # as PagedRunner's

    def __init__(self, model, *, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.device = model.get_input_embeddings().weight.device
        self._caches: dict[int, DynamicCache] = {}
        self._forward_kwargs = _forward_kwargs(model)

    def step(self, batch: StepBatch) -> torch.Tensor:
        for seq_id in batch.free:
            self._caches.pop(seq_id, None)
        rows = []
        for chunk in batch.chunks:
            cache = self._caches.get(chunk.seq_id)
            if cache is None or chunk.start == 0:
                cache = self._caches[chunk.seq_id] = DynamicCache(config=self.model.config)
            elif (stale := cache.get_seq_length() - chunk.start) > 0:
                # Positions fed but not kept (a speculation's rejected ids): the paged runner overwrites them in
                # place; a DynamicCache only appends, so they go first (a negative crop: every version's "remove").
                # Only full-attention layers can be cut back: the engine does not speculate on others (Engine).
                cache.crop(-stale)
            input_ids = torch.tensor([chunk.token_ids], dtype=torch.long, device=self.device)
            position_ids = torch.arange(
                chunk.start, chunk.start + len(chunk.token_ids), dtype=torch.long, device=self.device
            ).unsqueeze(0)
            kwargs = self._forward_kwargs(cache)
            if chunk.score_ids or chunk.logits_positions > 1:
                kwargs.pop("logits_to_keep", None)  # every position's logits
            with attention_kernels(self.device):  # a growing context is a new shape every step here too
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **kwargs)
            if chunk.score_ids and self.keeps_scores:
                batch.scores[chunk.seq_id] = score_positions(out.logits[0, :len(chunk.score_ids)], chunk.score_ids,
                                                             chunk.score_top)
            if chunk.want_logits:
                rows.extend(out.logits[0, -chunk.logits_positions:])
        if not rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return torch.stack(rows)


def classifier_head(model):
    """The classification head of a *ForSequenceClassification model (transformers' `score` linear, the hidden state
    to num_labels logits: a reranker's one relevance logit); None for any other model."""
    if classifier_architecture([type(model).__name__]) is None:
        return None
    return getattr(model, "score", None)


def pool_last_tokens(model, inputs: list[list[int]]) -> list[list[float]]:
    """The pooled output of each token id list at its last token (vLLM's default pooling for decoder models), in
    one forward (last_hidden_states): a classifier's head logits (classifier_head, no activation), else the final
    hidden state L2-normalized (the embedding). Run where the model's weights are: the engine thread, or the model
    process (runner_process.py)."""
    last = last_hidden_states(model, inputs)
    head = classifier_head(model)
    if head is not None:
        return head(last).to(torch.float32).tolist()
    return torch.nn.functional.normalize(last.to(torch.float32), dim=-1).tolist()


def last_hidden_states(model, inputs: list[list[int]]) -> torch.Tensor:
    """The base model's final hidden state at each input's last token ([len(inputs), hidden]), from ONE forward over
    the inputs padded on the right to the longest, with an attention mask that hides the padding. Under causal
    attention a real token never sees the padding after it, and each row's positions start at 0, so its states are
    those of the input run alone (up to the rounding of a larger matmul). Inputs of one length get no mask: the
    plain causal forward, as for a single input (no [rows, 1, longest, longest] mask is built)."""
    device = model.get_input_embeddings().weight.device
    lengths = [len(ids) for ids in inputs]
    longest = max(lengths)
    input_ids = torch.zeros(len(inputs), longest, dtype=torch.long)  # id 0 in the padding: any id the model has
    mask = torch.zeros(len(inputs), longest, dtype=torch.long)
    for row, ids in enumerate(inputs):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    padded = min(lengths) < longest
    hidden = model.base_model(input_ids=input_ids.to(device), position_ids=torch.arange(longest, device=device)
                              .expand(len(inputs), -1), attention_mask=mask.to(device) if padded else None,
                              use_cache=False).last_hidden_state
    return hidden[torch.arange(len(inputs), device=device), torch.tensor(lengths, device=device) - 1]


# Why a model the paged runner cannot serve takes no LoRA adapter (at the start, and on a runtime load).
LORA_NEEDS_PAGED = "LoRA adapters need the paged runner, which cannot serve this model"


def make_runner(model, *, num_blocks: int, block_size: int, batching: str = "auto",
                fast_path: bool = True, lora_adapters: dict[str, str] | None = None) -> ModelRunner:
    """batching: "auto" (paged if the model allows, else sequential), "paged" (or a clear error), "sequential".
    fast_path: the paged runner's CPU fast path (fastpath.py). lora_adapters: the paged runner's (lora.py); the
    sequential runner has none, so with adapters it is refused."""
    why_not = "batching='sequential' was asked for" if batching == "sequential" else paged_attention_supported(model)
    if why_not is None:
        return PagedRunner(model, num_blocks=num_blocks, block_size=block_size, fast_path=fast_path,
                           lora_adapters=lora_adapters)
    if lora_adapters:
        raise ValueError(f"{LORA_NEEDS_PAGED}: {why_not}")
    if batching == "paged":
        raise ValueError(f"batching='paged' cannot serve this model: {why_not}")
    return SequentialRunner(model, block_size=block_size)


def _forward_kwargs(model):
    """How this transformers version takes the cache (`cache`, formerly `past_key_values`), plus logits_to_keep."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return lambda cache: {cache_arg: cache, **extra}
