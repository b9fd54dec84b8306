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

import copy
import logging
import threading
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from hpcllm.checkpoint import InvalidIndex
from hpcllm.checkpoint.heads import auto_model_class, is_classifier

log = logging.getLogger(__name__)


def build_skeleton(config, dtype: torch.dtype):
    """The causal-LM class for `config` (a classifier's sequence-classification class: heads.auto_model_class),
    every parameter and buffer on the meta device, nothing initialised.

    ~15-30 ms for a 1B model (Python constructing ~300 modules). Buffers the checkpoint does not hold are computed
    by `attach`.
    """
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        return auto_model_class(config).from_config(config, dtype=dtype)


def loaded_dtypes(model, dtype: torch.dtype):
    """name -> the dtype from_pretrained(dtype=dtype) gives that floating tensor: the model's dtype plan (modules
    it keeps in float32, `_keep_in_fp32_modules_strict`, ...) where a pattern matches the name, else the dtype the
    skeleton built it in (a few parameters are float32 whatever the model's dtype), else `dtype`."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    pattern, group_glob, _ = build_glob_alternation(list(plan)) if plan else (None, {}, {})
    built = {name: t.dtype for name, t in model.named_parameters() if t.dtype != dtype}
    built.update((name, t.dtype) for name, t in model.named_buffers() if t.dtype != dtype)

    def dtype_of(name: str) -> torch.dtype:
        match = pattern.search(name) if pattern is not None else None
        if match is not None:
            return plan[group_glob[match.lastgroup]]
        return built.get(name, dtype)

    return dtype_of


def import_model_code(config) -> None:
    """Import the modeling code of `config`'s causal-LM class now, so its cost can be told apart from the build.

    For the first model of a process this imports transformers' whole modeling stack (torch._dynamo,
    torch.distributed.tensor, sympy, ...): ~2.5 s on these machines, more than loading a small model.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, \
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if is_classifier(config) else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        mapping[type(config)]
    except (KeyError, ValueError):
        pass  # not a causal LM: build_skeleton raises transformers' own error


class SkeletonCache:
    """Per-process templates: from the third skeleton for the same config on, it is cloned (~4 ms) instead of
    built (~20 ms). The first build costs nothing extra (one-off loads, the common case for a worker); the second
    also clones its fresh model, before anything is attached, into the template.

    A clone is a new module tree with the template's layout: new module objects whose parameter / buffer / hook
    dicts are copies (holding the template's meta tensors until `attach` replaces them), and its own deep copy of
    the config and generation config, so nothing mutable is shared between models. Only templates whose modules
    hold nothing else that could be shared - plain values, the config, meta tensors, submodules - are cached; any
    other architecture is built every time. The key is every attribute of the config as given (a build sets a
    few, e.g. dtype, on the config it gets: pass a freshly parsed config, as load_model does) plus the dtype.
    """

    def __init__(self, max_templates: int = 8):
        self.max_templates = max_templates
        self._templates: OrderedDict[tuple, nn.Module | None] = OrderedDict()  # None: seen once, no template yet
        self._cloneless: set[tuple] = set()  # configs whose models hold something a clone cannot copy
        self._lock = threading.Lock()
        self.hits = 0

    def skeleton(self, config, dtype: torch.dtype):
        key = (type(config), str(dtype), repr(sorted((name, repr(value)) for name, value in vars(config).items())))
        with self._lock:
            seen = key in self._templates
            template = self._templates.get(key)
            if seen:
                self._templates.move_to_end(key)
            else:  # a one-off load pays nothing for the cache; the second one makes the template
                self._remember(key, None)
        if template is not None:
            with self._lock:
                self.hits += 1
            return clone_skeleton(template)
        model = build_skeleton(config, dtype)
        if seen and key not in self._cloneless:
            template = clone_skeleton(model) if _cloneable(model) else None  # the model is still pristine
            with self._lock:
                if template is None:
                    self._cloneless.add(key)
                else:
                    self._remember(key, template)
        return model

    def _remember(self, key: tuple, template) -> None:
        self._templates[key] = template
        self._templates.move_to_end(key)
        while len(self._templates) > self.max_templates:
            self._templates.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._templates.clear()
            self._cloneless.clear()


_default_cache = SkeletonCache()


def cached_skeleton(config, dtype: torch.dtype):
    """build_skeleton through the process-wide SkeletonCache (what load_model uses)."""
    return _default_cache.skeleton(config, dtype)


def default_skeleton_cache() -> SkeletonCache:
    return _default_cache


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CONTAINERS = (dict, list, set)  # OrderedDict is a dict


def _plain(value, depth: int = 0) -> bool:
    """Immutable, or a container (copied per clone) of immutables: safe to share with / copy from a template."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, types.FunctionType):  # module-level functions (rope init ...), not closures over modules
        return value.__closure__ is None
    if depth > 3:
        return False
    if isinstance(value, (tuple, frozenset, list, set)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _cloneable(model: nn.Module) -> bool:
    """Whether every module of `model` holds only what a clone can copy or map to its own config copy."""
    from_config = _config_memo(model)
    return all(_module_cloneable(module, from_config, model) for module in model.modules())


def _module_cloneable(module: nn.Module, from_config: dict[int, object], model: nn.Module) -> bool:
    for name, value in module.__dict__.items():
        if name in ("_parameters", "_buffers"):
            if any(t is not None and not t.is_meta for t in value.values()):
                return False
        elif name != "_modules" and id(value) not in from_config and not _plain(value):
            if _held_modules_cloneable(value, from_config, model):
                continue
            log.debug("skeletons of %s are not cached: %s.%s is a %s", type(model).__name__,
                      type(module).__name__, name, type(value).__name__)
            return False
    return True


def _held_modules_cloneable(value, from_config: dict[int, object], model: nn.Module) -> bool:
    """A dict or list of unregistered, parameterless helper modules (transformers >= 5.25 keeps its hub-kernel
    functions so: `self._kernel_funcs = {"rotary_pos_emb": Func()}`), each cloneable itself."""
    if not isinstance(value, (dict, list)) or not value:
        return False
    items = value.values() if isinstance(value, dict) else value
    return all(isinstance(item, nn.Module) and not any(True for _ in item.children())
               and _module_cloneable(item, from_config, model) for item in items)


def _config_memo(model: nn.Module) -> dict[int, object]:
    """id(object reachable from the model's config / generation config) -> its counterpart in fresh deep copies."""
    memo: dict[int, object] = {}
    copy.deepcopy(model.config, memo)
    if getattr(model, "generation_config", None) is not None:
        copy.deepcopy(model.generation_config, memo)
    return memo


def clone_skeleton(template: nn.Module) -> nn.Module:
    """A new module tree laid out like `template` (see SkeletonCache); its own config and generation config."""
    return _clone_module(template, _config_memo(template))


def _clone_module(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    done = memo.get(id(module))
    if done is not None:  # a submodule used twice stays one module
        return done
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = {}
    for name, value in module.__dict__.items():
        if name == "_modules":
            value = {key: None if child is None else _clone_module(child, memo) for key, child in value.items()}
        elif id(value) in memo:
            value = memo[id(value)]
        elif isinstance(value, _CONTAINERS):
            value = _copy_container(value, memo)
        state[name] = value
    new.__dict__ = state
    return new


def _copy_container(value, memo: dict[int, object]):
    copied = value.copy()
    if isinstance(copied, dict):
        for key, item in copied.items():
            copied[key] = _copy_item(item, memo)
    elif isinstance(copied, list):
        copied[:] = [_copy_item(item, memo) for item in copied]
    return copied


def _copy_item(item, memo: dict[int, object]):
    if isinstance(item, nn.Module):  # a held helper module (see _held_modules_cloneable): the clone gets its own
        return _clone_module(item, memo)
    return _copy_container(item, memo) if isinstance(item, _CONTAINERS) else item


def attach(model, tensors: dict[str, torch.Tensor], aliases: dict[str, str], index_path: Path) -> list[str]:
    """Make `tensors` (+ aliases) the model's weights without copying, compute the buffers a checkpoint lacks and
    put the model in eval mode; returns the names the model did not take.

    The same as load_state_dict(state, strict=False, assign=True) + tie_weights() + from_pretrained's init of
    missing buffers + eval(), done on the modules' parameter / buffer dicts in one walk over the modules (a 1B
    model has ~300): a few ms instead of ~30. An alias gets the very Parameter of its target (tied weights).
    """
    modules = dict(model.named_modules())
    unexpected = _assign(modules, tensors, aliases, index_path)
    _untie_what_is_stored_apart(model, tensors, index_path)
    if getattr(model, "all_tied_weights_keys", None) or getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights(recompute_mapping=False)  # the mapping post_init computed for this very config
    missing = _materialize_and_check(model, modules)
    if missing:
        raise InvalidIndex(f"{index_path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                           f"{', '.join(missing[:3])}; it was converted from a different model than config.json "
                           f"describes")
    if unexpected:
        log.warning("%s: %d tensors are not used by %s (e.g. %s)", index_path, len(unexpected), type(model).__name__,
                    unexpected[0])
    _set_eval(model, modules.values())
    return unexpected


def _untie_what_is_stored_apart(model, tensors: dict[str, torch.Tensor], index_path: Path) -> None:
    """Tied names the checkpoint stores apart are not tied, as in transformers 5's from_pretrained: a config saying
    tie_word_embeddings over a checkpoint holding an lm_head of its own gets that lm_head (vLLM ties them). The
    converter stores a tied name apart only when its values differ (else it is an alias: docs/checkpoint-format.md).
    A tensor-parallel instance splits that lm_head too, so every degree answers alike."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    apart = [target for target, source in tied.items() if target in tensors and source in tensors]
    if not apart:
        return
    # Also logged for engine = "vllm" (its loader comes through here), where vLLM ties them anyway.
    log.warning("%s: config.json ties %s to %s, but the checkpoint holds both with different values: hpcllm's engine "
                "keeps the stored %s, as from_pretrained does; vLLM ties it. Set tie_word_embeddings = false in "
                "config.json to say which is meant", index_path, apart[0], tied[apart[0]], apart[0])
    model.all_tied_weights_keys = {target: source for target, source in tied.items() if target not in apart}


def _assign(modules: dict[str, nn.Module], tensors, aliases, index_path: Path) -> list[str]:
    unexpected = []
    parameters: dict[str, nn.Parameter] = {}  # stored name -> its Parameter, shared by its aliases
    for name, stored in [*((n, n) for n in tensors), *aliases.items()]:
        tensor = tensors[stored]
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            unexpected.append(name)
            continue
        current = module._parameters.get(attr)
        if current is not None:
            _check_shape(name, current, tensor, index_path)
            param = parameters.get(stored)
            if param is None:
                param = parameters[stored] = nn.Parameter(tensor, requires_grad=current.requires_grad)
            module._parameters[attr] = param
        elif module._buffers.get(attr) is not None and attr not in module._non_persistent_buffers_set:
            _check_shape(name, module._buffers[attr], tensor, index_path)
            module._buffers[attr] = tensor
        else:
            unexpected.append(name)
    return unexpected


def _materialize_and_check(model, modules: dict[str, nn.Module]) -> list[str]:
    """Compute every buffer still on meta (rotary inv_freq, ...) exactly as from_pretrained does; returns the names
    of parameters still on meta (the checkpoint lacks them).

    from_pretrained gives such buffers CPU storage and re-runs the models' own `_init_weights` over the module tree
    (each module by its nearest PreTrainedModel, children first), with loaded tensors flagged `_is_hf_initialized`
    so transformers' init functions leave them alone. Same here, but only for the modules holding such a buffer
    and their ancestors: a parent may fill its children's buffers (Falcon-H1's model fills every mixer's
    mup_vector).
    """
    missing, pending = [], []
    for module_name, module in modules.items():
        prefix = module_name + "." if module_name else ""
        missing.extend(prefix + attr for attr, p in module._parameters.items() if p is not None and p.is_meta)
        meta = [attr for attr, b in module._buffers.items() if b is not None and b.is_meta]
        if meta:
            pending.append((module_name, module, meta))
    if not pending:
        return missing
    for tensor in [*model.parameters(), *model.buffers()]:  # loaded: init functions must leave them alone
        tensor._is_hf_initialized = True
    for _, module, meta in pending:
        for attr in meta:
            module._buffers[attr] = torch.empty_like(module._buffers[attr], device="cpu")
    to_init = {ancestor for name, _, _ in pending for ancestor in _self_and_ancestors(name)}
    with torch.no_grad():
        for name in sorted(to_init, key=lambda n: -n.count(".") - bool(n)):  # children first, as smart_apply
            _owner(modules, name, model)._init_weights(modules[name])
    return missing


def _self_and_ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _owner(modules: dict[str, nn.Module], name: str, model):
    """The nearest PreTrainedModel at or above module `name` (whose _init_weights from_pretrained applies to it)."""
    from transformers import PreTrainedModel

    for ancestor in _self_and_ancestors(name):
        if isinstance(modules[ancestor], PreTrainedModel):
            return modules[ancestor]
    return model


def materialize_missing_buffers(model) -> list[str]:
    """For models filled by other means (load_state_dict(assign=True) after build_skeleton): compute the buffers a
    checkpoint does not hold, as attach does; returns the names of parameters still on meta."""
    return _materialize_and_check(model, dict(model.named_modules()))


def _set_eval(model, modules) -> None:
    """model.eval() without its recursive walk (~2 ms for 300 modules): set `training` on every module directly,
    unless a module overrides train() (then its own eval runs, as from_pretrained's would)."""
    from transformers import PreTrainedModel

    plain = (nn.Module.train, PreTrainedModel.train)
    if getattr(model, "use_kernels", False) or any(type(module).train not in plain for module in modules):
        model.eval()
        return
    for module in modules:
        object.__setattr__(module, "training", False)


def _check_shape(name: str, current: torch.Tensor, loaded: torch.Tensor, index_path: Path) -> None:
    if current.shape != loaded.shape:
        raise InvalidIndex(f"{index_path}: tensor {name!r} has shape {list(loaded.shape)} but the model built from "
                           f"config.json expects {list(current.shape)}; the checkpoint and its config do not match")


def move_buffers(model, device_of) -> None:
    """Put every buffer (computed on CPU by the constructor) on the device its name maps to."""
    for name, buffer in list(model.named_buffers()):
        device = torch.device(device_of(name))
        if buffer.device != device:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = buffer.to(device)
