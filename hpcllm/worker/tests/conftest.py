"""Worker test fixtures: the devmodels tiny models (root conftest's tiny_models), loaded once per session."""

from __future__ import annotations

import functools

import pytest

from hpcllm.devmodels import ARCHITECTURES

ARCHS = list(ARCHITECTURES)


@pytest.fixture(scope="session")
def model_dirs(tiny_models):
    return tiny_models


@pytest.fixture(scope="session")
def load_pair(model_dirs):
    """load_pair(arch) -> (model, tokenizer), loaded once per session with from_pretrained. Do not modify them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    @functools.cache
    def load(arch):
        path = model_dirs[arch]
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    return load
