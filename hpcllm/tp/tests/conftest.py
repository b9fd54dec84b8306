from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tp_llama(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """The tiny dev Llama (4 heads, 2 KV heads, MLP 128, vocabulary 1024, untied) converted, with slice hashes."""
    from hpcllm.checkpoint import convert

    out = tmp_path_factory.mktemp("tp") / "llama"
    convert(tiny_llama_dir, out, progress=False, chunk_size=16384)
    return out


@pytest.fixture(scope="session")
def wide_llama(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """A one-layer fp32 Llama wide enough (hidden 2048, MLP 2048) that a rank's share of a row of o_proj /
    down_proj is a whole 4 KiB page at degree 2: dim-1 slices can be read at 1/N of their bytes. ~112 MB. With the
    tiny dev Llama's tokenizer files (the same vocabulary size), for the self check's prompt."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcllm.checkpoint import convert

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=1024, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    convert(root / "hf", root / "ckpt", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, root / "ckpt" / name)
    return root / "ckpt"


@pytest.fixture(scope="session")
def tp_qwen2(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    """The tiny dev Qwen2 (biases on q/k/v: split with their colwise weights) converted, with slice hashes."""
    from hpcllm.checkpoint import convert

    out = tmp_path_factory.mktemp("tp") / "qwen2"
    convert(tiny_qwen2_dir, out, progress=False)
    return out
