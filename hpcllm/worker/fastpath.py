"""The paged runner's CPU fast path: fused projections and oneDNN-packed linear layers, built once at engine start.

Measured on this project's CPUs (docs/serving-bench.md): at 16 decoding requests the matmuls are most of a step, and
torch's default CPU linear (MKL sgemm on a [out, in] weight) reaches ~15-45 GFLOP/s at 16 rows; oneDNN with the
weight reordered once into its blocked layout (what vLLM's CPU backend does, `onednn_mm`) is ~1.3-1.8x faster at
16-64 rows. So, on CPU, for float32 models:

- fused projections: an attention module of the Llama family (Llama, Mistral, Qwen2: q/k/v as separate Linears,
  Qwen2's with biases) gets one `qkv_proj` (weights and biases concatenated) and a forward that splits its output;
  an MLP of the family gets one `gate_up_proj`. One matmul instead of three (two), and fewer small ops.
- packed linears: every `nn.Linear` (the fused ones included) keeps its module (so forward hooks, e.g. the
  tensor-parallel all-reduce on o_proj/down_proj, still run) but its weight is replaced by the oneDNN-packed copy
  and its forward calls oneDNN. A linear whose weight is shared (tied embeddings) is left alone.

Built from the model as loaded (no converted checkpoint), after tensor-parallel sharding: a rank fuses its own
q/k/v (gate/up) slices, which hold the same heads (rows) in every projection, so the fused split sizes are the
local ones. The original weights are dropped from the modules; their memory is freed where they own it
(`from_pretrained`). Weights that are views of a larger load buffer (hpcllm's zero-copy CPU loader) are listed in
`FastPath.dropped_ranges` for the buffer's owner to release (the worker: LoadedModel.discard). In a model process
the worker's own copy of the model drops the same weights by name (`FastPath.dropped_weights`, drop_weights).

The rewritten forwards are the transformers forwards of those classes with the projections fused: nothing else
changes (rotary, cache update, the attention function, `generate` on the same model). Results differ from the
unfused model only by float rounding (a different matmul kernel); greedy equality with `generate` on an untouched
model is tested per architecture (test_fastpath.py, test_batching.py).
"""

from __future__ import annotations

import itertools
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Attention classes whose forward is Llama's (q/k/v Linears, rotary, cache update, the attention interface) and what
# each passes as `sliding_window` to the attention function (None: not passed).
FUSABLE_ATTENTION: dict[str, Callable[[nn.Module], dict]] = {
    "LlamaAttention": lambda attention: {},
    "MistralAttention": lambda attention: {"sliding_window": getattr(attention.config, "sliding_window", None)},
    "Qwen2Attention": lambda attention: {"sliding_window": attention.sliding_window},
}
# MLP classes computing down_proj(act_fn(gate_proj(x)) * up_proj(x)).
FUSABLE_MLP = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})
PACKED_DTYPES = (torch.float32,)


@dataclass
class FastPath:
    """What prepare() did to a model (the engine logs it; tests and bench/decode_step.py read it)."""

    fused_attention: int = 0
    fused_mlp: int = 0
    packed_linear: int = 0
    skipped: str | None = None  # why nothing was done (not CPU, no oneDNN)
    lean_step: str | None = None  # "on" when the paged runner steps the model by LeanStep, else why not
    # (address, bytes) of dropped weights that are views of a larger buffer (a loader's): freeing them is the
    # buffer owner's job (LoadedModel.discard); no range overlaps a tensor the model still uses.
    dropped_ranges: list[tuple[int, int]] = field(default_factory=list, compare=False, repr=False)
    # Qualified names of the parameters the modules no longer hold: a model process reports them, so the worker can
    # drop the same weights from its own copy of the model (drop_weights).
    dropped_weights: list[str] = field(default_factory=list, compare=False, repr=False)


def prepare(model: nn.Module) -> FastPath:
    """Fuse and pack `model` in place for the CPU fast path; idempotent (a second call finds nothing to do)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "cpu":
        return FastPath(skipped=f"the model is on {weight.device}, the fast path is for CPU")
    if not torch.backends.mkldnn.is_available():
        return FastPath(skipped="this torch has no oneDNN (mkldnn)")
    done = FastPath()
    before = _parameter_names(model)
    dropped: list[tuple[int, int]] = []  # ranges, not tensors: a dropped weight with its own storage is freed now
    with torch.no_grad():
        for module in list(model.modules()):
            kind = type(module).__name__
            if kind in FUSABLE_ATTENTION and _fusable(module, ("q_proj", "k_proj", "v_proj")):
                dropped += _fuse_attention(module, FUSABLE_ATTENTION[kind](module))
                done.fused_attention += 1
            elif kind in FUSABLE_MLP and _fusable(module, ("gate_proj", "up_proj")):
                dropped += _fuse_mlp(module)
                done.fused_mlp += 1
        shared = _shared_weights(model)
        for module in model.modules():
            if _packable(module, shared):
                dropped += _pack(module)
                done.packed_linear += 1
    done.dropped_ranges = _buffer_ranges(dropped, model)
    done.dropped_weights = sorted(before - _parameter_names(model))
    return done


def _parameter_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def drop_weights(model: nn.Module, names: list[str]) -> list[tuple[int, int]]:
    """Replace the named parameters of `model` by meta tensors (same shape and dtype, no memory): the worker's copy
    of a model whose model process built fused, packed copies of them (its FastPath.dropped_weights). A weight with
    its own storage is freed with its last reference; returns the (address, bytes) ranges of those that were views
    of a larger buffer and that no tensor the model still holds overlaps, for the buffer's owner to release
    (LoadedModel.discard), like prepare()'s dropped_ranges."""
    dropped: list[tuple[int, int]] = []
    if names:
        model.hpcllm_dropped_weights = list(names)  # weights_dropped(); meta alone could be accelerate's offload
    for name in names:
        owner_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner_name)
        weight = module._parameters[attribute]
        dropped += _view_ranges([weight])
        module._parameters[attribute] = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
    return _buffer_ranges(dropped, model)


def weights_dropped(model: nn.Module) -> bool:
    """Whether drop_weights left the model without some of its weights (it cannot run, or be handed on, any more)."""
    return bool(getattr(model, "hpcllm_dropped_weights", None))


def _buffer_ranges(dropped: list[tuple[int, int]], model: nn.Module) -> list[tuple[int, int]]:
    """The dropped ranges no tensor the model still uses overlaps (tied or aliased bytes stay)."""
    live = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in (*model.parameters(), *model.buffers())
            if not t.is_mkldnn and t.device.type == "cpu"]
    return [(start, length) for start, length in dropped
            if not any(start < live_end and live_start < start + length for live_start, live_end in live)]


def _view_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(address, bytes) of those tensors that are views of a larger storage (a loader's buffer); a tensor with its
    own storage is freed with its last reference."""
    return [(t.data_ptr(), t.nbytes) for t in tensors if t.untyped_storage().nbytes() > t.nbytes]


# ---- fusion ------------------------------------------------------------------------------------------------------

def _fusable(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Plain Linears with one input size, dtype and device, and no hooks (nothing observes them one by one)."""
    parts = [getattr(module, name, None) for name in names]
    if not all(type(part) is nn.Linear and "weight" in part._parameters for part in parts):
        return False
    if any(part._forward_hooks or part._forward_pre_hooks for part in parts):
        return False
    first = parts[0].weight
    return all(p.weight.shape[1] == first.shape[1] and p.weight.dtype == first.dtype
               and p.weight.device == first.device and (p.bias is None) == (parts[0].bias is None) for p in parts)


def _fused_linear(parts: list[nn.Linear], names: tuple[str, ...]) -> nn.Linear:
    """One linear of the parts' weights (and biases) concatenated; `fused_parts` names each part's output columns
    (name -> (start, stop)): where a LoRA adapter of a part adds its delta (lora.py)."""
    weight = torch.cat([part.weight for part in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                      device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([part.bias for part in parts]), requires_grad=False)
    stops = list(itertools.accumulate(part.weight.shape[0] for part in parts))
    fused.fused_parts = {name: (stop - part.weight.shape[0], stop) for name, part, stop in zip(names, parts, stops)}
    return fused


def _fuse_attention(attention: nn.Module, attention_kwargs: dict) -> list[torch.Tensor]:
    """Returns the dropped weights' and biases' ranges in a larger buffer (_view_ranges)."""
    names = ("q_proj", "k_proj", "v_proj")
    parts = [getattr(attention, name) for name in names]
    attention.qkv_proj = _fused_linear(parts, names)
    # From the weights: under tensor parallelism a shard's Linear keeps the whole model's out_features attribute.
    attention.qkv_sizes = [part.weight.shape[0] for part in parts]
    attention.fused_attention_kwargs = attention_kwargs
    modeling = sys.modules[type(attention).__module__]  # that model's own rotary and eager attention
    attention.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
    attention.eager_attention_forward = modeling.eager_attention_forward
    del attention.q_proj, attention.k_proj, attention.v_proj
    attention.forward = types.MethodType(_fused_attention_forward, attention)
    return _weights_of(parts)


def _weights_of(linears: list[nn.Linear]) -> list[tuple[int, int]]:
    return _view_ranges([t for linear in linears for t in (linear.weight, linear.bias) if t is not None])


def _fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                             **kwargs):
    """transformers' LlamaAttention.forward (Mistral's, Qwen2's) with q/k/v from one matmul."""
    if cache is None:  # the name before transformers 5.x's rename
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = self.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                self.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        **self.fused_attention_kwargs, **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _fuse_mlp(mlp: nn.Module) -> list[torch.Tensor]:
    names = ("gate_proj", "up_proj")
    parts = [getattr(mlp, name) for name in names]
    mlp.gate_up_proj = _fused_linear(parts, names)
    mlp.gate_size = mlp.gate_proj.weight.shape[0]
    del mlp.gate_proj, mlp.up_proj
    mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
    return _weights_of(parts)


def _fused_mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).split(self.gate_size, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


# ---- oneDNN-packed linears ------------------------------------------------------------------------------------------

def _shared_weights(model: nn.Module) -> set[int]:
    """Ids of parameters held by more than one module (tied embeddings): packing would copy them."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _packable(module: nn.Module, shared: set[int]) -> bool:
    if not isinstance(module, nn.Linear) or "weight" not in module._parameters:
        return False  # not a Linear, or packed already
    weight = module.weight
    return weight.dtype in PACKED_DTYPES and weight.dim() == 2 and id(weight) not in shared


def _pack(linear: nn.Linear) -> list[tuple[int, int]]:
    """Returns the dropped weight's range in a larger buffer (_view_ranges)."""
    dropped = _view_ranges([linear.weight])
    # A plain attribute, not a parameter: an opaque oneDNN tensor cannot be moved by module.to() or saved.
    linear.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
    del linear.weight
    linear.forward = types.MethodType(_packed_linear_forward, linear)
    return dropped


def is_packed(model: nn.Module) -> bool:
    """Whether a fast path packed some of the model's linears in place (oneDNN tensors: not shareable, not saved)."""
    return any(hasattr(module, "packed_weight") for module in model.modules())


def _packed_linear_forward(self, x):
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


# ---- the lean step: the fused model's forward as one plain loop -----------------------------------------------------

# Causal LMs whose forward is Llama's: embed, rotary, decoder layers (RMSNorm, attention, residual, RMSNorm, MLP,
# residual), final RMSNorm, lm_head over the kept rows. Their rotary functions are the same code.
LEAN_MODELS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


class LeanStep:
    """One paged step of a fused Llama-family model without transformers' module machinery.

    What a step's forward does is the transformers forward of these classes, in the same order of float operations,
    minus what only costs time there: the nn.Module calls (hook checks, kwargs plumbing) of ~10 modules per layer
    (each module's own forward is called directly: the norms', the fast path's packed linears'),
    the model-level decorators and output classes, the causal-mask construction the paged attention ignores, and
    the separate rotary passes over q and k (here one pass over both: they are adjacent in the fused q/k/v output,
    and the rotation is elementwise). On the dev machine's small Llama at 16 decoding requests that is several
    hundred Python-level calls per step (docs/worker.md, "The lean step"). Nothing is observed per module, so the
    engine uses it only where no module has hooks (not under tensor parallelism: the all-reduce is a hook)."""

    def __init__(self, model: nn.Module, attention: Callable) -> None:
        inner = model.model
        self.embed, self.rotary, self.norm, self.lm_head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        self.attention = attention  # the paged attention function (runner.py)
        modeling = sys.modules[type(self.layers[0].self_attn).__module__]
        self.rotate_half = modeling.rotate_half

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [1, tokens, 1, dim]: broadcast over the heads
        for layer in self.layers:
            hidden = self._layer(layer, hidden, cos, sin)
        return self.lm_head.forward(self.norm.forward(hidden[:, keep]))[0]

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attention, mlp = layer.self_attn, layer.mlp
        tokens, head_dim = hidden.shape[1], attention.head_dim
        q_size, k_size, v_size = attention.qkv_sizes
        q_and_k, value = attention.qkv_proj.forward(layer.input_layernorm.forward(hidden)).split(
            [q_size + k_size, v_size], dim=-1)
        q_and_k = q_and_k.view(1, tokens, -1, head_dim)
        q_and_k = (q_and_k * cos) + (self.rotate_half(q_and_k) * sin)  # apply_rotary_pos_emb's formula, q and k at once
        query_heads = q_size // head_dim
        query = q_and_k[:, :, :query_heads].transpose(1, 2)
        key = q_and_k[:, :, query_heads:].transpose(1, 2)
        value = value.view(1, tokens, -1, head_dim).transpose(1, 2)
        out, _ = self.attention(attention, query, key, value, None, dropout=0.0, scaling=attention.scaling,
                                **attention.fused_attention_kwargs)
        hidden = hidden + attention.o_proj.forward(out.reshape(1, tokens, -1))
        gate, up = mlp.gate_up_proj.forward(layer.post_attention_layernorm.forward(hidden)).split(mlp.gate_size, dim=-1)
        return hidden + mlp.down_proj.forward(mlp.act_fn(gate) * up)


def lean_step(model: nn.Module, attention: Callable) -> tuple[LeanStep | None, str]:
    """A LeanStep for a model prepare() fused, or None and why not."""
    if type(model).__name__ not in LEAN_MODELS:
        return None, f"{type(model).__name__} is not of the Llama family"
    inner = getattr(model, "model", None)
    layers = list(getattr(inner, "layers", []))[: model.config.num_hidden_layers]
    if not layers or not all(hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")
                             for layer in layers):
        return None, "not every layer's projections are fused"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or _global_hooks():
        return None, "modules have hooks (tensor parallelism?)"
    if not _rotation_matches(layers[0].self_attn):
        return None, "the model's rotary embedding is not the q*cos + rotate_half(q)*sin of the family"
    return LeanStep(model, attention), "on"


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _rotation_matches(attention: nn.Module) -> bool:
    """Whether the model's apply_rotary_pos_emb is the elementwise q*cos + rotate_half(q)*sin the lean step applies
    to q and k together (checked on numbers, once: a future transformers may change it)."""
    modeling = sys.modules[type(attention).__module__]
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    rotate_half = getattr(modeling, "rotate_half", None)
    if apply is None or rotate_half is None:
        return False
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, 3, 8, generator=generator) for heads in (4, 2))
    cos, sin = (torch.randn(1, 3, 8, generator=generator) for _ in range(2))
    expected_q, expected_k = apply(q, k, cos, sin)
    both = torch.cat([q, k], dim=1).transpose(1, 2)  # [1, tokens, heads, dim], as the lean step holds them
    rotated = ((both * cos.unsqueeze(2)) + (rotate_half(both) * sin.unsqueeze(2))).transpose(1, 2)
    return torch.equal(rotated[:, :4], expected_q) and torch.equal(rotated[:, 4:], expected_k)
