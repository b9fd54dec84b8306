"""LoRA adapters on the paged runner's base model (multi-LoRA, vLLM's `--enable-lora --lora-modules name=path`).

A worker is started with adapters (name -> PEFT folder: adapter_config.json + adapter_model.safetensors); each
request may name one (GenerateRequest.lora). The base weights stay as they are: on every targeted linear layer a
batched step adds, for the rows (packed tokens) of each adapter in the batch, scale * (x @ A^T) @ B^T, one gather and
two small matmuls per adapter and layer (a loop over the few adapters of the step); rows without adapter, and every
step without one, run the base layer alone.

Targets: the linear layers inside the model's decoder (Llama-like q/k/v/o/gate/up/down_proj). The CPU fast path
fuses q/k/v and gate/up into one linear (fastpath.py): an adapter of q_proj then adds its delta to q's slice of the
fused output (the fused module's `fused_parts`). Refused with the reason: DoRA, modules_to_save, embedding or
lm_head targets, trained biases, fan_in_fan_out (GPT-2's Conv1D layers), per-layer rank or alpha patterns, and
shapes that do not fit the base model. The adapters are read from the folders given where the forward runs (the
model process, or the engine's process): at start, and one at a time when the worker loads one at runtime (add,
remove: between steps, never while one runs; the engine's load_lora / unload_lora).
"""

from __future__ import annotations

import contextlib
import re
import threading
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hpcllm.worker.lora_config import (ADAPTER_WEIGHTS, AdapterConfig, AdapterError, check_adapter_names,
                                      read_adapter_config)

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


@dataclass
class LoraWeights:
    a_t: torch.Tensor  # [in, r]: A transposed
    b_t: torch.Tensor  # [r, out]: (scale * B) transposed


def read_adapter(name: str, folder: str | Path, config: AdapterConfig | None = None) -> dict[str, LoraWeights]:
    """A PEFT LoRA adapter's weights from its folder, by module name in the model as loaded (PEFT's key without its
    prefix); refused with the reason when it is one this runner cannot apply. config: its adapter config where the
    caller read it already (a runtime load: EngineBase.load_lora), else read here."""
    if config is None:
        config = read_adapter_config(name, folder)
    weights_path = Path(folder) / ADAPTER_WEIGHTS
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors' own error types vary by version
        raise AdapterError(f"LoRA adapter {name!r}: {weights_path} is not a readable safetensors file: {exc}") from None
    return _pair_weights(name, tensors, config.rank, config.scale)


def _pair_weights(name: str, tensors: dict[str, torch.Tensor], rank: int, scale: float) -> dict[str, LoraWeights]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            what = "an embedding target" if "lora_embedding" in key else "not a LoRA A/B weight"
            raise AdapterError(f"LoRA adapter {name!r}: tensor {key!r} is {what}; only linear layers' lora_A/lora_B "
                               "weights are supported")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    weights = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {name!r}: {module} has lora_{''.join(pair)} without its other half")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"LoRA adapter {name!r}: {module}'s lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)} do not have rank r = {rank}")
        weights[module] = LoraWeights(a.t().contiguous(), (b.float() * scale).t().contiguous())
    if not weights:
        raise AdapterError(f"LoRA adapter {name!r}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return weights


# ---- applying them ---------------------------------------------------------------------------------------------

_active = threading.local()  # the running step's row groups on this thread: [(adapter key, rows)], or None
AdapterKey = tuple[str, str]  # (name, folder): one name may be served from a new folder while the old one retires


@dataclass
class _Segment:
    """Output columns start..stop of a linear layer (all of it, or one projection of a fused one) and the adapters'
    weights for it."""

    start: int
    stop: int
    by_adapter: dict[AdapterKey, LoraWeights]


class LoraLayers:
    """Adapters installed on a model's linear layers (after the fast path fused them). Within a step with adapters
    (rows()) each targeted layer's forward is _lora_forward, which adds its adapters' deltas to their rows; outside,
    and in every step without one, the layer's own forward runs as if no adapter were loaded."""

    def __init__(self, model: nn.Module, adapters: dict[str, str]) -> None:
        self.model = model
        self.keys: list[AdapterKey] = []
        self.modules: list[nn.Module] = []
        _uninstall(model)
        for name, folder in sorted(adapters.items()):
            self.add(name, folder)

    def add(self, name: str, folder: str | Path, config: AdapterConfig | None = None) -> None:
        """Install one more adapter (the worker's runtime load: between steps, never while one runs; config: as
        read_adapter's). Every check is done before the first layer changes: a refused adapter leaves the others as
        they were."""
        check_adapter_names({name: str(folder)})
        key = (name, str(folder))
        if key in self.keys:
            raise AdapterError(f"LoRA adapter {name!r} from {folder} is already installed")
        dtype, device = _dtype_device(self.model)
        placed = []
        for module_name, weights in read_adapter(name, folder, config).items():
            module, start, stop = _target(self.model, name, module_name)
            _check_shapes(name, module_name, weights, module.in_features, stop - start)
            placed.append((module, start, stop, LoraWeights(weights.a_t.to(device, dtype),
                                                            weights.b_t.to(device, dtype))))
        for module, start, stop, weights in placed:
            if module not in self.modules:
                module.lora_base_forward = module.forward
                module.lora_forward = types.MethodType(_lora_forward, module)
                module.lora_segments = []
                self.modules.append(module)
            at = next((s for s in module.lora_segments if s.start == start), None)
            if at is None:
                module.lora_segments.append(at := _Segment(start, stop, {}))
            at.by_adapter[key] = weights
        self.keys = sorted([*self.keys, key])

    def remove(self, name: str, folder: str | Path) -> None:
        """Take an adapter's weights off every layer (between steps, once no request runs with it); a layer left
        without adapters gets its own forward back for good."""
        key = (name, str(folder))
        for module in list(self.modules):
            for segment in module.lora_segments:
                segment.by_adapter.pop(key, None)
            module.lora_segments = [segment for segment in module.lora_segments if segment.by_adapter]
            if not module.lora_segments:
                module.forward = module.lora_base_forward
                del module.lora_base_forward, module.lora_forward, module.lora_segments
                self.modules.remove(module)
        self.keys = [k for k in self.keys if k != key]

    @contextlib.contextmanager
    def rows(self, spans: list[tuple[AdapterKey | None, int, int]], device: torch.device):
        """Within: the adapters of a step whose packed rows begin..end-1 belong to each span's adapter (its key;
        None: the base model's). The targeted layers' forwards are swapped for the step (one attribute each), not
        wrapped for good: a step without adapters pays nothing."""
        _active.groups = _row_groups(spans, device)
        for module in self.modules:
            module.forward = module.lora_forward
        try:
            yield
        finally:
            for module in self.modules:
                module.forward = module.lora_base_forward
            _active.groups = None


def _row_groups(spans: list[tuple[AdapterKey | None, int, int]], device: torch.device) -> list | None:
    """Per adapter in the step, its rows: a slice when they are one range (a view, no gather), else an index."""
    ranges: dict[AdapterKey, list[tuple[int, int]]] = {}
    for key, begin, end in spans:
        if key is not None and end > begin:
            ranges.setdefault(key, []).append((begin, end))
    groups = []
    for key, spans_of in ranges.items():
        spans_of.sort()
        if all(spans_of[i][1] == spans_of[i + 1][0] for i in range(len(spans_of) - 1)):
            groups.append((key, slice(spans_of[0][0], spans_of[-1][1])))
        else:
            groups.append((key, torch.tensor([r for b, e in spans_of for r in range(b, e)], device=device)))
    return groups or None


def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.lora_base_forward(x)
    groups = getattr(_active, "groups", None) or ()
    rows_in, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    for key, rows in groups:
        selected = None
        for segment in self.lora_segments:
            weights = segment.by_adapter.get(key)
            if weights is None:
                continue
            if selected is None:
                selected = rows_in[rows]
            rows_out[rows, segment.start:segment.stop] += (selected @ weights.a_t) @ weights.b_t
    return out


def _uninstall(model: nn.Module) -> None:
    """Forget an earlier install (the same model given to another runner)."""
    for module in model.modules():
        if hasattr(module, "lora_base_forward"):
            module.forward = module.lora_base_forward
            del module.lora_base_forward, module.lora_forward, module.lora_segments


def _target(model: nn.Module, adapter: str, module_name: str) -> tuple[nn.Module, int, int]:
    """The linear layer an adapter's module name targets and its output columns (a slice of a fused layer)."""
    leaf = module_name.rpartition(".")[2]
    if leaf in ("lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out"):
        raise AdapterError(f"LoRA adapter {adapter!r} targets {module_name}: embedding and lm_head targets are not "
                           "supported (only the decoder's linear layers)")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if isinstance(module, nn.Linear):
        return module, 0, module.out_features
    if module is None:
        parent_name = module_name.rpartition(".")[0]
        with contextlib.suppress(AttributeError):
            for fused in model.get_submodule(parent_name).children():
                part = getattr(fused, "fused_parts", {}).get(leaf)
                if part is not None:
                    return fused, *part
    kind = "does not exist in" if module is None else f"is a {type(module).__name__}, not a linear layer of"
    raise AdapterError(f"LoRA adapter {adapter!r} targets {module_name}, which {kind} this base model "
                       f"({type(model).__name__}): was it trained for another model?")


def _check_shapes(adapter: str, module_name: str, weights: LoraWeights, in_features: int, out_features: int) -> None:
    if weights.a_t.shape[0] != in_features or weights.b_t.shape[1] != out_features:
        raise AdapterError(f"LoRA adapter {adapter!r}: {module_name} takes {in_features} inputs and gives "
                           f"{out_features} outputs in this base model, the adapter's weights "
                           f"{weights.a_t.shape[0]} and {weights.b_t.shape[1]}: was it trained for another model?")


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = model.get_input_embeddings().weight
    return weight.dtype, weight.device
