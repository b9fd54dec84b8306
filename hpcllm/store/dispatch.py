"""Run a model whose modules sit on different devices (a device_map split): move inputs to each module's device.

Each module named in the device_map gets a forward pre-hook that moves the tensors in its positional and keyword
arguments (recursively through tuples, lists and dicts) to the device of its weights; the outermost model moves
its outputs back to the device of its first tensor input. This is the part of accelerate's dispatch_model that a
split inference model needs, without the dependency.
"""

from __future__ import annotations

import torch


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_to(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return type(value)({k: _to(v, device) for k, v in value.items()})
    return value


def _first_device(args, kwargs) -> torch.device | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _devices(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in module.parameters()} | {t.device for t in module.buffers()}


def align_devices(model: torch.nn.Module) -> list:
    """Hook every largest submodule that sits wholly on one device; returns the handles (.remove() undoes)."""
    handles = []
    for name, module in model.named_modules():
        if module is model:
            continue
        devices = _devices(module)
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if len(devices) != 1 or len(_devices(parent)) == 1:
            continue  # split further down, holds nothing, or covered by its parent's hook
        device = next(iter(devices))

        def pre_hook(mod, args, kwargs, device=device):
            return _to(args, device), _to(kwargs, device)

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def outer_pre_hook(mod, args, kwargs):
        mod._hpcllm_input_device = _first_device(args, kwargs)

    def outer_hook(mod, args, kwargs, output):
        device = getattr(mod, "_hpcllm_input_device", None)
        return output if device is None else _to_output(output, device)

    handles.append(model.register_forward_pre_hook(outer_pre_hook, with_kwargs=True))
    handles.append(model.register_forward_hook(outer_hook, with_kwargs=True))
    return handles


def _to_output(output, device: torch.device):
    if isinstance(output, dict):  # transformers ModelOutput (an OrderedDict): set fields in place
        for key in list(output.keys()):
            if isinstance(output[key], torch.Tensor):
                output[key] = output[key].to(device)
        return output
    return _to(output, device)
