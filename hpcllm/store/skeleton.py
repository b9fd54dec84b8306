"""Build a transformers model without initialising weights, then attach loaded tensors to it.

The model is built on the meta device with initialisation disabled (no memory, no random init: ~15-30 ms for a
1B model instead of ~8 s). `attach` then assigns the loaded tensors (views of the load buffers, no copy) directly
into the modules' parameter / buffer dicts, re-ties shared weights, and computes the buffers a checkpoint does not
hold. Those matter: non-persistent buffers (rotary `inv_freq`, ...) are not in checkpoints; left on meta the model
would fail or compute garbage. They are computed the way from_pretrained computes them, by the model's own
`_init_weights` (the tests compare every buffer against from_pretrained). A model with anything still on meta is
refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from hpcllm.checkpoint import InvalidIndex

log = logging.getLogger(__name__)


def build_skeleton(config, dtype: torch.dtype):
    """The causal-LM class for `config`, every parameter and buffer on the meta device, nothing initialised.

    ~15-30 ms for a 1B model. Buffers the checkpoint does not hold are computed by `materialize_buffers` after
    the weights are attached.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def materialize_buffers(model) -> None:
    """Compute every buffer still on meta (rotary inv_freq, ...) exactly as from_pretrained does.

    from_pretrained gives such buffers CPU storage and re-runs the model's own `_init_weights` on their modules,
    with loaded tensors flagged `_is_hf_initialized` so transformers' init functions leave them alone. Same here.
    """
    pending, fresh = [], set()
    for module in model.modules():
        meta = [name for name, buf in module._buffers.items() if buf is not None and buf.device.type == "meta"]
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
            fresh.add(id(module._buffers[name]))
        if meta:
            pending.append(module)
    if not pending:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in fresh:
            tensor._is_hf_initialized = True
    with torch.no_grad():
        for module in pending:
            model._init_weights(module)


def attach(model, tensors: dict[str, torch.Tensor], aliases: dict[str, str], index_path: Path) -> list[str]:
    """Make `tensors` (+ aliases) the model's weights without copying; returns the names the model did not take.

    The same as load_state_dict(state, strict=False, assign=True) for a plain transformers model, done directly
    on the modules' parameter / buffer dicts: a few ms for a 1B model instead of ~30 ms.
    """
    modules = dict(model.named_modules())
    unexpected = []
    for name, tensor in [*tensors.items(), *((alias, tensors[target]) for alias, target in aliases.items())]:
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        if module is not None and attr in module._parameters and module._parameters[attr] is not None:
            current = module._parameters[attr]
            _check_shape(name, current, tensor, index_path)
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=current.requires_grad)
        elif module is not None and attr in module._buffers and attr not in module._non_persistent_buffers_set:
            _check_shape(name, module._buffers[attr], tensor, index_path)
            module._buffers[attr] = tensor
        else:
            unexpected.append(name)
    if getattr(model, "all_tied_weights_keys", None) or getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model)
    if unexpected:
        log.warning("%s: %d tensors are not used by %s (e.g. %s)", index_path, len(unexpected), type(model).__name__,
                    unexpected[0])
    still_meta = [name for name, t in _named_tensors(model) if t.device.type == "meta"]
    if still_meta:
        raise InvalidIndex(f"{index_path}: the checkpoint lacks {len(still_meta)} tensor(s) the model needs, e.g. "
                           f"{', '.join(still_meta[:3])}; it was converted from a different model than config.json "
                           f"describes")
    return unexpected


def _check_shape(name: str, current: torch.Tensor, loaded: torch.Tensor, index_path: Path) -> None:
    if tuple(current.shape) != tuple(loaded.shape):
        raise InvalidIndex(f"{index_path}: tensor {name!r} has shape {list(loaded.shape)} but the model built from "
                           f"config.json expects {list(current.shape)}; the checkpoint and its config do not match")


def _named_tensors(model):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def move_buffers(model, device_of) -> None:
    """Put every buffer (computed on CPU by the constructor) on the device its name maps to."""
    for name, buffer in list(model.named_buffers()):
        device = torch.device(device_of(name))
        if buffer.device != device:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = buffer.to(device)
