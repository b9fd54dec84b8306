"""Which part of each tensor a tensor-parallel rank holds, derived from the model's own transformers TP plan.

transformers ships a tensor-parallel plan with each model that supports TP: the config class's
`base_model_tp_plan` (module patterns under the base model, e.g. `layers.*.self_attn.q_proj: colwise`) and the
causal-LM class's `_tp_plan` (`lm_head: colwise_gather_output`). hpcllm reads those instead of keeping its own
table, and maps each style to the dimension a rank's slice is cut along:

  colwise, colwise_gather_output   Linear weight [out, in] split on dim 0 (its bias on dim 0): each rank computes
                                   its share of the outputs; colwise_gather_output all-gathers them afterwards
  rowwise                          Linear weight split on dim 1 (the inputs); the partial outputs are summed
                                   across ranks (all-reduce); a bias is kept whole and added once after the sum
  anything else in the plan that only concerns gradients (replicated_with_grad_allreduce) is replicated

Everything the plan does not name (norms, embeddings in transformers 5's Llama-family plans, rotary buffers) is
replicated. Styles hpcllm's TP forward cannot run (packed / MoE / split-input styles) are refused by name.

The plan depends on the checkpoint and the degree only, never on how the checkpoint was converted: one converted
checkpoint serves every degree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from hpcllm.errors import ConfigError

COLWISE = "colwise"
COLWISE_GATHER = "colwise_gather_output"
ROWWISE = "rowwise"
# Styles that change only how gradients are reduced: for inference the module is replicated.
REPLICATED_STYLES = frozenset({"replicated_with_grad_allreduce", "replicate", "all_reduce"})
SUPPORTED_STYLES = frozenset({COLWISE, COLWISE_GATHER, ROWWISE}) | REPLICATED_STYLES


class TensorParallelError(ConfigError):
    """A model cannot be split N ways (or its plan holds a style hpcllm cannot run); the message names numbers."""


@dataclass(frozen=True)
class ModulePlan:
    """The TP plan of one model as full module-name regexes (`model.layers.3.self_attn.q_proj`) -> style."""

    rules: tuple[tuple[re.Pattern, str], ...]

    def style_of(self, module_name: str) -> str | None:
        for pattern, style in self.rules:
            if pattern.fullmatch(module_name):
                return None if style in REPLICATED_STYLES else style
        return None

    def split_dim(self, tensor_name: str, ndim: int) -> int | None:
        """The dimension this tensor is split along, None when every rank holds all of it."""
        module_name, _, attr = tensor_name.rpartition(".")
        style = self.style_of(module_name)
        if style in (COLWISE, COLWISE_GATHER):
            return 0 if ndim >= 1 else None
        if style == ROWWISE:
            return 1 if attr == "weight" and ndim >= 2 else None  # the bias is added once, after the sum
        return None


def _pattern(prefix: str, key: str) -> re.Pattern:
    full = f"{prefix}.{key}" if prefix else key
    return re.compile(r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in full.split(".")))


def module_plan(config) -> ModulePlan:
    """The model's TP plan from its transformers config and causal-LM class (no model is built)."""
    base_plan = getattr(config, "base_model_tp_plan", None)
    if not base_plan:
        raise TensorParallelError(
            f"model type {config.model_type!r} has no tensor-parallel plan in transformers (its config class has no "
            f"base_model_tp_plan): serve it with tensor_parallel = 1"
        )
    model_class = causal_lm_class(config)
    prefix = getattr(model_class, "base_model_prefix", "model")
    rules = [(_pattern(prefix, key), style) for key, style in base_plan.items()]
    rules += [(_pattern("", key), style) for key, style in (getattr(model_class, "_tp_plan", None) or {}).items()]
    unsupported = sorted({f"{p.pattern}: {s}" for p, s in rules if s not in SUPPORTED_STYLES})
    if unsupported:
        raise TensorParallelError(
            f"model type {config.model_type!r}: hpcllm's tensor parallelism supports the styles "
            f"{', '.join(sorted(SUPPORTED_STYLES))}; its plan uses {'; '.join(unsupported)}"
        )
    return ModulePlan(tuple(rules))


def causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        raise TensorParallelError(f"model type {config.model_type!r} is not a causal language model transformers "
                                  f"knows") from None


def check_degree(config, degree: int) -> None:
    """Raise TensorParallelError naming every number that does not divide by `degree` (a model config check: the
    checkpoint's shapes are checked again by `slice_plan`)."""
    if degree == 1:
        return
    plan = module_plan(config)  # the model must have a plan at all
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    checks = [
        ("attention heads (num_attention_heads)", heads),
        ("KV heads (num_key_value_heads)", kv_heads),
        ("MLP intermediate size (intermediate_size)", getattr(config, "intermediate_size", None)),
        ("vocabulary (vocab_size)", getattr(config, "vocab_size", None)),
    ]
    problems = [f"{what} = {value} is not divisible by {degree}" for what, value in checks
                if isinstance(value, int) and value % degree]
    problems += [f"{name} holds one row per head ({list(shape)}) but its plan keeps it whole on every rank"
                 for name, shape in _whole_per_head_parameters(config, plan, {heads, kv_heads})]
    if problems:
        raise TensorParallelError(f"tensor_parallel = {degree} does not fit model type {config.model_type!r}: "
                                  + "; ".join(problems))


def _whole_per_head_parameters(config, plan: ModulePlan, head_counts: set) -> list[tuple[str, tuple[int, ...]]]:
    """Parameters beside split projections that the plan keeps whole although their rows are heads (Cohere's
    q_norm/k_norm with use_qk_norm: [heads, head_dim]): a rank holding some heads would meet every head's row and
    fail its first forward on the shapes. One entry per kind of parameter (layer numbers as *)."""
    import torch

    from hpcllm.store.skeleton import build_skeleton

    model = build_skeleton(config, torch.float32)  # meta device: shapes only
    split_parents = {name.rpartition(".")[0] for name, _ in model.named_modules() if plan.style_of(name)}
    found: dict[str, tuple[int, ...]] = {}
    for name, parameter in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if (parameter.dim() >= 2 and parameter.shape[0] in head_counts and parameter.shape[0] > 1
                and module_name.rpartition(".")[0] in split_parents and plan.style_of(module_name) is None):
            found.setdefault(re.sub(r"\.\d+\.", ".*.", name), tuple(parameter.shape))
    return sorted(found.items())


def model_config(source: str | Path, degree: int):
    """The transformers config of the model at `source` (its config.json), to check or plan tensor_parallel =
    `degree`; TensorParallelError naming the file when it is missing or not a model's config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as exc:
        raise TensorParallelError(f"cannot read {Path(source) / 'config.json'} to check tensor_parallel = {degree}: "
                                  f"{exc}") from None


def check_model_dir(source: str | Path, degree: int) -> None:
    """check_degree against `source`/config.json (the deploy-time check)."""
    if degree == 1:
        return
    check_degree(model_config(source, degree), degree)


@dataclass(frozen=True)
class TensorSlice:
    """The part of one stored tensor a rank holds: indices [start, stop) of dimension `dim` (None: all of it)."""

    name: str  # the model's name for it (an alias name when it is tied to another tensor)
    stored: str  # the name it is stored under in index.json
    dim: int | None
    start: int
    stop: int
    full_shape: tuple[int, ...]

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)


def rank_range(size: int, degree: int, rank: int) -> tuple[int, int]:
    share = size // degree
    return rank * share, (rank + 1) * share


def slice_plan(shapes: dict[str, tuple[int, ...]], aliases: dict[str, str], plan: ModulePlan, degree: int,
               rank: int) -> list[TensorSlice]:
    """Every tensor the model needs (stored tensors and aliases) with the slice rank `rank` of `degree` holds.

    `shapes` maps stored names to full shapes (index.json). A split dimension that does not divide by the degree
    is a TensorParallelError naming the tensor and both numbers.
    """
    if not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is outside a degree-{degree} group")
    slices = []
    for name, stored in [*((n, n) for n in shapes), *aliases.items()]:
        shape = tuple(shapes[stored])
        dim = plan.split_dim(name, len(shape)) if degree > 1 else None
        if dim is None:
            slices.append(TensorSlice(name, stored, None, 0, shape[0] if shape else 1, shape))
            continue
        if shape[dim] % degree:
            raise TensorParallelError(f"tensor {name} has {shape[dim]} along dimension {dim} (shape "
                                      f"{list(shape)}), not divisible by tensor_parallel = {degree}")
        start, stop = rank_range(shape[dim], degree, rank)
        slices.append(TensorSlice(name, stored, dim, start, stop, shape))
    return slices


# Replicated tensors up to this many bytes in all are read once by rank 0 and broadcast (hpcllm.tp.mpiload).
DEFAULT_BCAST_MAX_BYTES = 64 << 20


class _NoPlan:
    def split_dim(self, name: str, ndim: int) -> None:
        return None


def rank_slices(ckpt, config, size: int, rank: int, bcast_max_bytes: int = DEFAULT_BCAST_MAX_BYTES):
    """(slices this rank reads itself, replicated slices rank 0 reads and broadcasts to everyone)."""
    from hpcllm.checkpoint.layout import DTYPE_ITEMSIZE

    shapes = {name: tuple(entry.shape) for name, entry in ckpt.tensors.items()}
    slices = slice_plan(shapes, ckpt.aliases, module_plan(config) if size > 1 else _NoPlan(), size, rank)
    replicated = [s for s in slices if s.dim is None]
    replicated_bytes = sum(math.prod(s.full_shape) * DTYPE_ITEMSIZE[ckpt.tensors[s.stored].dtype]
                           for s in replicated)
    bcast = replicated if size > 1 and replicated_bytes <= bcast_max_bytes else []
    return [s for s in slices if s not in bcast or rank == 0], bcast
