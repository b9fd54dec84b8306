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


def test_a_config_without_a_length_gets_the_same_context_length_everywhere(model_dirs, tmp_path):
    """config.json without max_position_embeddings (and a tokenizer without model_max_length): the model
    from_pretrained builds has transformers' default (LlamaConfig: 2048), which the worker's engine served, while
    deploy, the gateway's static models and its /v1/models (which read config.json) refused the model ("does not
    give the model's context length"), or with a max_model_len above 2048 accepted a deployment the worker then
    refused to start. All now serve, list and enforce transformers' default."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.config import StaticModel
    from hpcllm.gateway.routing import StaticRouter

    folder = shutil.copytree(model_dirs["llama"], tmp_path / "no-length")
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        data = json.loads((folder / name).read_text())
        del data[key]
        (folder / name).write_text(json.dumps(data))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    default = model.config.max_position_embeddings

    assert Engine(model, tokenizer).max_model_len == default
    assert source_max_model_len(folder) == default  # deploy (controller), the node agent's check
    [card] = StaticRouter({"m": StaticModel(worker_url="http://w:1", source=folder)},
                          shared_secret="s" * 32).list_models()
    assert card.max_model_len == default  # the gateway's checks and /v1/models
    too_long = "max_model_len = 4096 is more than the model's context length of 2048 tokens"
    with pytest.raises(ContextLengthError, match=too_long):
        source_max_model_len(folder, 4096)
    with pytest.raises(ContextLengthError, match=too_long):
        Engine(model, tokenizer, max_model_len=4096)
