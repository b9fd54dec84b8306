"""Skeleton templates: a cloned skeleton is laid out exactly like a fresh build and shares nothing mutable."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hpcllm.store import skeleton as skeleton_module
from hpcllm.store.loader import load_model
from hpcllm.store.skeleton import SkeletonCache, build_skeleton, clone_skeleton, default_skeleton_cache
from hpcllm.store.tests.conftest import ARCHS, _config, reference
from hpcllm.store.tests.test_loader import assert_same_model, tied_pairs

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")


def _layout(model):
    out = []
    for name, module in model.named_modules():
        plain = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, type(None)))}
        tensors = {k: (tuple(t.shape), t.dtype, t.device.type) for k, t in
                   [*module._parameters.items(), *module._buffers.items()] if t is not None}
        out.append((name, type(module), sorted(vars(module)), plain, tensors,
                    sorted(module._non_persistent_buffers_set)))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "opt"])
def test_clone_is_laid_out_like_a_fresh_build(arch):
    fresh = build_skeleton(_config(arch), torch.float16)
    template = build_skeleton(_config(arch), torch.float16)
    clone = clone_skeleton(template)
    assert _layout(clone) == _layout(fresh)
    assert clone.config is not template.config and clone.config.to_dict() == fresh.config.to_dict()
    assert clone.generation_config is not template.generation_config
    template_modules = {id(m) for m in template.modules()}
    for module in clone.modules():
        assert id(module) not in template_modules
        if "config" in vars(module):
            assert module.config is clone.config  # every module sees the clone's own config
        for name in HOOK_DICTS:
            assert getattr(module, name) is not getattr(template.get_submodule(""), name)
    for (_, mine), (_, theirs) in zip(clone.named_modules(), template.named_modules()):
        assert mine._parameters is not theirs._parameters and mine._buffers is not theirs._buffers
        # helper modules held in a plain dict (transformers >= 5.25: `_kernel_funcs`) are the clone's own too
        for name, value in vars(mine).items():
            if isinstance(value, dict) and value and all(isinstance(v, nn.Module) for v in value.values()):
                assert value is not vars(theirs)[name]
                assert not {id(v) for v in value.values()} & {id(v) for v in vars(theirs)[name].values()}


@pytest.mark.parametrize("arch", ARCHS)
def test_repeated_loads_clone_the_skeleton_and_match_from_pretrained(models, arch):
    hf, converted = models(arch)
    cache = default_skeleton_cache()
    cache.clear()
    hits = cache.hits
    loads = [load_model(converted, tokenizer=False) for _ in range(3)]
    assert cache.hits == hits + 1  # 1st: built, 2nd: built + template taken, 3rd: cloned
    first, cloned = loads[0].model, loads[2].model
    assert_same_model(reference(hf), cloned)
    for target, source in tied_pairs(cloned):
        assert cloned.get_parameter(target) is cloned.get_parameter(source)
    # nothing shared between two models of the same config
    assert {id(m) for m in first.modules()}.isdisjoint(id(m) for m in cloned.modules())
    assert cloned.config is not first.config
    first.config.use_cache = not cloned.config.use_cache
    first.register_forward_pre_hook(lambda module, args: None)
    assert not cloned._forward_pre_hooks
    assert cloned.config.use_cache != first.config.use_cache


class _Holder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(4, 4, device="meta")
        self.state = object()  # something a clone could only share: never cloned


def test_a_model_holding_unknown_objects_is_built_every_time(monkeypatch):
    monkeypatch.setattr(skeleton_module, "build_skeleton", lambda config, dtype: _Holder(config))
    cache = SkeletonCache()
    config = _config("llama")
    models = [cache.skeleton(config, torch.float32) for _ in range(4)]
    assert cache.hits == 0
    assert len({id(m.state) for m in models}) == 4


def test_cache_keeps_a_bounded_number_of_templates():
    cache = SkeletonCache(max_templates=2)
    configs = [_config("llama") for _ in range(3)]
    for i, config in enumerate(configs):
        config.vocab_size = 384 + 64 * i
    for config in configs:  # a build sets dtype / attention fields on its config: each load parses a fresh one
        for _ in range(2):
            cache.skeleton(copy.deepcopy(config), torch.float32)
    assert len(cache._templates) == 2
    model = cache.skeleton(copy.deepcopy(configs[-1]), torch.float32)
    assert cache.hits == 1 and model.get_input_embeddings().weight.shape[0] == 384 + 128


def test_the_skeleton_does_not_import_h5py():
    """The store loads a model without h5py (the converter's writer): importing it costs every model load."""
    import subprocess
    import sys

    check = "import sys, hpcllm.store.skeleton; print('h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
