"""Fixtures for the checkpoint tests: tiny HF model folders and helpers that read tensors back by raw offset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpcllm.checkpoint.layout import DEFAULT_CHUNK_SIZE, Checkpoint, TensorEntry, dtype_name


@pytest.fixture(scope="session")
def hf_models(tiny_models, tiny_sharded_dir, tiny_bin_dir, tiny_models_root) -> dict[str, Path]:
    """arch -> tiny HF model folder (hpcllm.devmodels): every architecture, plus sharded safetensors, .bin and
    sharded .bin variants. Tests must not modify them."""
    from hpcllm.devmodels import make_model

    return {**tiny_models, "sharded": tiny_sharded_dir, "bin": tiny_bin_dir,
            "sharded_bin": make_model("gpt2", tiny_models_root / "checkpoint-gpt2-bin-3", shards=3, fmt="bin")}


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



def write_checkpoint(tensors: dict[str, torch.Tensor], out: Path, partitions: int = 1,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, side_files: dict[str, str] | None = None) -> Path:
    """A checkpoint of arbitrary tensors (every dtype, odd shapes) that no transformers model holds, written with the
    converter's own writer: the converter takes only folders transformers can build a model from."""
    from hpcllm.checkpoint.converter import _model_info
    from hpcllm.checkpoint.slicehashes import write_slice_hashes
    from hpcllm.checkpoint.writer import (TensorSpec, assign_partitions, describe_side_file, finish_partition,
                                          partition_path, write_index, write_manifest, write_partition)

    out.mkdir()
    specs = [TensorSpec(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    entries, written = [], []
    for index, group in enumerate(assign_partitions(specs, partitions)):
        path = partition_path(out, index)
        entries.extend(write_partition(path, group, tensors.__getitem__, index).values())
        written.append(finish_partition(path, index, chunk_size))
    for name, text in (side_files or {}).items():
        (out / name).write_text(text)
    write_manifest(out, written, write_index(out, entries, {}), [describe_side_file(out / n) for n in side_files or {}],
                   _model_info({}, entries, {}, None), {"format": "safetensors", "files": []})
    write_slice_hashes(out, verify=False)
    return out
