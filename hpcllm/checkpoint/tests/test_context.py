"""A model's context length from its config, on configs written by transformers' own config classes.

Each case is saved with save_pretrained (the config.json a user's checkpoint holds) and read back the way deploy and
the gateway read it; the worker reads the loaded config object (to_dict), and both must give the same number. The
expected numbers are what vLLM serves these models with.
"""

from __future__ import annotations

import json
import sys

import pytest
import transformers

from hpcllm.checkpoint.context import (
    ContextLengthError,
    context_window,
    max_model_len_for,
    source_max_model_len,
)

SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128, vocab_size=256)

# (case, config built by transformers, the largest max_model_len, the default without one)
CASES = [
    ("gpt2 n_positions", lambda: transformers.GPT2Config(n_positions=1024), 1024, 1024),
    ("opt max_position_embeddings", lambda: transformers.OPTConfig(max_position_embeddings=2048), 2048, 2048),
    ("mpt max_seq_len", lambda: transformers.MptConfig(max_seq_len=2048), 2048, 2048),
    # Llama 3.1: max_position_embeddings is already the extended length; llama3 RoPE does not multiply it again.
    ("llama-3.1 rope llama3", lambda: transformers.LlamaConfig(
        **SMALL, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0}), 131072, 131072),
    # Linear (position interpolation) and dynamic NTK scaling stretch the trained positions by `factor`.
    ("llama-2 rope linear x2", lambda: transformers.LlamaConfig(
        **SMALL, max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 2.0}), 8192, 8192),
    ("llama rope dynamic x4", lambda: transformers.LlamaConfig(
        **SMALL, max_position_embeddings=2048, rope_scaling={"rope_type": "dynamic", "factor": 4.0}), 8192, 8192),
    # Qwen2.5 with YaRN: original_max_position_embeddings x factor.
    ("qwen2.5 rope yarn x4", lambda: transformers.Qwen2Config(
        **SMALL, max_position_embeddings=32768,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 131072, 131072),
    # Mistral's sliding window does not shorten the context: attention keeps the last 4096 tokens at any length.
    ("mistral sliding window", lambda: transformers.MistralConfig(
        **SMALL, max_position_embeddings=32768, sliding_window=4096), 32768, 32768),
    # Phi-3 128k (LongRoPE): deployable up to 131072, served by default with the original 4096.
    ("phi-3 longrope", lambda: transformers.Phi3Config(
        **SMALL, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}), 131072, 4096),
    # Gemma 3 states its scaled length already (and keeps one RoPE setting per layer type).
    ("gemma3 rope linear x8", lambda: transformers.Gemma3TextConfig(
        **SMALL, head_dim=16, max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0}),
     131072, 131072),
    # A multimodal model: its text model's positions decide.
    ("llava text_config", lambda: transformers.LlavaConfig(
        text_config={"model_type": "llama", "max_position_embeddings": 4096}), 4096, 4096),
]


@pytest.mark.parametrize("case, make, limit, default", CASES, ids=[c[0] for c in CASES])
def test_context_length_of_real_configs(tmp_path, case, make, limit, default):
    config = make()
    config.save_pretrained(tmp_path)
    assert source_max_model_len(tmp_path) == default
    assert source_max_model_len(tmp_path, limit) == limit
    assert source_max_model_len(tmp_path, 100) == 100
    with pytest.raises(ContextLengthError) as refused:
        source_max_model_len(tmp_path, limit + 1)
    assert f"max_model_len = {limit + 1} is more than the model's context length of {limit} tokens" in str(
        refused.value)
    assert str(tmp_path / "config.json") in str(refused.value)
    # The worker reads the loaded config object (transformers 5 turns rope_scaling into rope_parameters): same answer.
    assert max_model_len_for(config.to_dict()) == default


def test_config_json_of_transformers_4_with_rope_scaling():
    """Checkpoints saved before transformers 5 keep `rope_scaling` (with the old `type` key) in config.json."""
    config = {"model_type": "llama", "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}
    window = context_window(config)
    assert (window.limit, window.derived_from) == (16384, "max_position_embeddings=4096 x rope factor 4")


def test_smallest_position_key_wins_and_config_model_max_length_overrides():
    assert max_model_len_for({"max_position_embeddings": 4096, "seq_length": 2048}) == 2048
    # Command-R: config.json's model_max_length is the length served, even above max_position_embeddings.
    assert max_model_len_for({"model_type": "cohere", "max_position_embeddings": 8192,
                              "model_max_length": 131072}) == 131072


def test_tokenizer_model_max_length_caps_the_config(tmp_path):
    transformers.GPT2Config(n_positions=1024).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    assert source_max_model_len(tmp_path) == 512
    with pytest.raises(ContextLengthError, match="tokenizer_config.json model_max_length=512"):
        source_max_model_len(tmp_path, 1024)
    # Tokenizers without a limit say 1e30 (transformers' VERY_LARGE_INTEGER): no cap.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert source_max_model_len(tmp_path) == 1024


def test_a_config_without_a_length_needs_max_model_len(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom", "hidden_size": 64}))
    with pytest.raises(ContextLengthError, match="does not give the model's context length.*set max_model_len"):
        source_max_model_len(tmp_path)
    assert source_max_model_len(tmp_path, 3000) == 3000  # nothing to check it against: taken as given


@pytest.mark.parametrize("content, message", [
    (None, "config.json does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "does not hold a JSON object"),
])
def test_unreadable_config_says_which_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ContextLengthError, match=message) as error:
        source_max_model_len(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


@pytest.mark.parametrize("config", [
    '{"max_position_embeddings": Infinity}', '{"max_position_embeddings": NaN}',
    '{"text_config": {"max_position_embeddings": 1e400}}', '{"max_position_embeddings": 1e30}',
    '{"max_position_embeddings": "4096"}',
])
def test_a_length_that_is_no_number_of_tokens_is_no_length(tmp_path, config):
    # Before: OverflowError / ValueError tracebacks (500s at deploy); now the config names no length.
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ContextLengthError, match="set max_model_len"):
        source_max_model_len(tmp_path)
    assert source_max_model_len(tmp_path, 2048) == 2048


@pytest.mark.parametrize("factor", ['"abc"', "Infinity", "[1]", "NaN", "-2"])
def test_a_rope_factor_that_is_no_factor_is_ignored(factor):
    config = json.loads(f'{{"max_position_embeddings": 2048, "rope_scaling": {{"type": "linear", "factor": {factor}}}}}')
    assert context_window(config).limit == 2048


def test_a_config_that_is_a_fifo_or_deeply_nested_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "config.json")  # a read would wait for a writer forever
    with pytest.raises(ContextLengthError, match="is not a regular file"):
        source_max_model_len(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 64}')
    os.mkfifo(tmp_path / "tokenizer_config.json")
    with pytest.raises(ContextLengthError, match="tokenizer_config.json is not a regular file"):
        source_max_model_len(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text("[" * 100_000)
    with pytest.raises(ContextLengthError, match="is not valid JSON"):
        source_max_model_len(tmp_path)


def test_transformers_default_is_named_only_when_it_is_the_length():
    """A config.json without a length gets transformers' default for its model_type (LlamaConfig: 2048), and the
    message says so; when the tokenizer's model_max_length is the smaller one, the message names the tokenizer only."""
    with pytest.raises(ContextLengthError, match="transformers' default max_position_embeddings=2048 for llama, "
                                                 "which is not set"):
        max_model_len_for({"model_type": "llama"}, 4096)
    with pytest.raises(ContextLengthError, match="context length of 1024 tokens") as error:
        max_model_len_for({"model_type": "llama"}, 4096, tokenizer_max_length=1024)
    assert "(tokenizer_config.json model_max_length=1024 in the model's config)" in str(error.value)
    assert "transformers' default" not in str(error.value)


def test_a_multimodal_config_without_a_length_gets_its_text_models_default(tmp_path):
    """{"model_type": "llava"} alone: from_pretrained builds LlavaConfig, whose text_config is a LlamaConfig with
    max_position_embeddings 2048, which the worker serves; deploy read config.json and refused the model."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    worker_sees = transformers.AutoConfig.from_pretrained(tmp_path).to_dict()
    assert source_max_model_len(tmp_path) == max_model_len_for(worker_sees) == 2048
    with pytest.raises(ContextLengthError, match="transformers' default max_position_embeddings=2048 for llava"):
        source_max_model_len(tmp_path, 4096)


def test_a_config_transformers_cannot_build_is_a_clear_error(monkeypatch):
    """A config.json without a length is read as transformers builds it: a value its config class refuses, or a
    config module that fails to import, is a ContextLengthError (400 at deploy) instead of a traceback (500)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with pytest.raises(ContextLengthError, match="cannot build its 'llama' config.*hidden size \\(65\\)"):
        max_model_len_for({"model_type": "llama", "hidden_size": 65, "num_attention_heads": 4})
    monkeypatch.setattr(CONFIG_MAPPING, "_modules", {})  # not imported yet in this process
    monkeypatch.setitem(sys.modules, "transformers.models.llama", None)  # and its import fails
    with pytest.raises(ContextLengthError, match="cannot build its 'llama' config.*ModuleNotFoundError"):
        max_model_len_for({"model_type": "llama"})
