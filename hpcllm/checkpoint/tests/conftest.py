"""Fixtures for the checkpoint tests: tiny HF model folders and helpers that read tensors back by raw offset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpcllm.checkpoint.layout import Checkpoint, TensorEntry


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """{"llama", "gpt2", "sharded", "bin"} -> a tiny Hugging Face model folder (float32, seeded)."""
    try:
        from hpcllm.devmodels import make_model
    except ImportError:
        make_model = _interim_make_model
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_model("llama", root / "llama", size="tiny", seed=0),
        "gpt2": make_model("gpt2", root / "gpt2", size="tiny", seed=1),
        "sharded": make_model("llama", root / "sharded", size="tiny", shards=3, seed=2),
        "bin": make_model("gpt2", root / "bin", size="tiny", seed=3, fmt="bin"),
    }


def source_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in an HF folder's weight files, read with the reference libraries."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(path))
    for path in sorted(hf_dir.glob("pytorch_model*.bin")):
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    assert state, f"no weights in {hf_dir}"
    return state


def read_raw(ckpt: Checkpoint, entry: TensorEntry) -> torch.Tensor:
    """A tensor rebuilt only from the bytes at its recorded offset (how the loader reads it)."""
    with open(ckpt.partitions[entry.partition].path, "rb") as f:
        f.seek(entry.offset)
        data = f.read(entry.nbytes)
    assert len(data) == entry.nbytes
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=ckpt.torch_dtype(entry))
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(ckpt.torch_dtype(entry)).reshape(entry.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def _interim_make_model(arch, out_dir, size="tiny", shards=1, seed=0, fmt="safetensors"):
    # TEMPORARY until hpcllm.devmodels lands (being written in parallel); then this goes.
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=128))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    if fmt == "bin":
        model.config.save_pretrained(out_dir)
        torch.save(model.state_dict(), Path(out_dir) / "pytorch_model.bin")
    else:
        model.save_pretrained(out_dir, max_shard_size="40KB" if shards > 1 else "5GB")
    (Path(out_dir) / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return Path(out_dir)
