"""The engine's context length is the one deploy and the gateway derive (hpcllm.checkpoint.context)."""

from __future__ import annotations

import pytest

from hpcllm.checkpoint.context import ContextLengthError, source_max_model_len
from hpcllm.worker.engine import Engine


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_serves_the_context_length_deploy_derives(load_pair, model_dirs, arch):
    model, tokenizer = load_pair(arch)
    assert Engine(model, tokenizer).max_model_len == source_max_model_len(model_dirs[arch]) == 512
    assert Engine(model, tokenizer, max_model_len=300).max_model_len == 300


def test_engine_refuses_more_than_the_model_has(load_pair):
    model, tokenizer = load_pair("gpt2")
    with pytest.raises(ContextLengthError, match="max_model_len = 2048 is more than the model's context length of "
                                                 "512 tokens \\(n_positions=512"):
        Engine(model, tokenizer, max_model_len=2048)
