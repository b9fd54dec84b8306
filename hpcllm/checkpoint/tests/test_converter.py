"""Converting tiny HF models: bit-exact round trips through raw offsets, aliases, side files, atomic publish, errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcllm.checkpoint import (
    ALIGNMENT,
    CheckpointError,
    InvalidSource,
    OutputExists,
    read_checkpoint,
)
from hpcllm.checkpoint import converter as converter_module
from hpcllm.checkpoint.converter import convert
from hpcllm.checkpoint.tests.conftest import read_raw, same_bits, source_state_dict

ARCHS = ["llama", "gpt2", "qwen2", "opt", "sharded", "bin", "sharded_bin"]


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {arch: convert(hf_models[arch], root / arch, partitions=2).root for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_round_trips_bit_exactly_through_raw_offsets(arch, hf_models, converted):
    ckpt = read_checkpoint(converted[arch])
    source = source_state_dict(hf_models[arch])
    stored_or_aliased = set(ckpt.tensors) | set(ckpt.aliases)
    assert set(source) <= stored_or_aliased
    for name, expected in source.items():
        entry = ckpt.resolve(name)
        assert entry.offset % ALIGNMENT == 0
        assert same_bits(read_raw(ckpt, entry), expected), name


@pytest.mark.parametrize("arch", ARCHS)
def test_every_dataset_reads_back_with_h5py(arch, converted):
    ckpt = read_checkpoint(converted[arch])
    for name, entry in ckpt.tensors.items():
        with h5py.File(ckpt.partitions[entry.partition].path, "r", locking=False) as f:
            dataset = f[name]
            assert dataset.attrs["torch_dtype"] == entry.dtype
            assert tuple(dataset.attrs["shape"]) == entry.shape
            assert dataset.id.get_offset() == entry.offset
            assert dataset[()].tobytes() == read_raw(ckpt, entry).reshape(-1).view(torch.uint8).numpy().tobytes()


def test_partitions_balance_bytes_and_files_verify(converted):
    ckpt = read_checkpoint(converted["llama"])
    assert len(ckpt.partitions) == 2
    per_partition = [sum(e.nbytes for e in ckpt.tensors.values() if e.partition == p.index)
                     for p in ckpt.partitions]
    largest_tensor = max(e.nbytes for e in ckpt.tensors.values())
    assert abs(per_partition[0] - per_partition[1]) <= largest_tensor
    ckpt.verify_files()
    ckpt.check_files_present()


def test_gpt2_tied_lm_head_is_stored_once_as_an_alias(hf_models, converted):
    ckpt = read_checkpoint(converted["gpt2"])
    assert ckpt.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in ckpt.tensors


def test_bin_shared_storage_is_stored_once(hf_models, converted):
    state = torch.load(next(hf_models["bin"].glob("pytorch_model*.bin")), weights_only=True)
    shared = "lm_head.weight" in state and (
        state["lm_head.weight"].untyped_storage().data_ptr()
        == state["transformer.wte.weight"].untyped_storage().data_ptr())
    ckpt = read_checkpoint(converted["bin"])
    assert ckpt.aliases == {"lm_head.weight": "transformer.wte.weight"}, f"lm_head shares storage: {shared}"
    assert ckpt.model["num_tensors"] == len(ckpt.tensors)


def test_identical_untied_bytes_are_not_aliased(tmp_path):
    # Two zero biases in a model without ties must stay separate tensors: only real ties become aliases.
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    save_file({"a.bias": torch.zeros(8), "b.bias": torch.zeros(8)}, hf / "model.safetensors")
    ckpt = convert(hf, tmp_path / "out")
    assert ckpt.aliases == {} and set(ckpt.tensors) == {"a.bias", "b.bias"}


def test_side_files_are_copied_with_checksums(hf_models, converted):
    ckpt = read_checkpoint(converted["llama"])
    copied = {s.file for s in ckpt.side_files}
    source_files = {p.name for p in hf_models["llama"].iterdir()
                    if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".index.json"))}
    assert "config.json" in copied and source_files == copied
    for name in copied:
        assert (ckpt.root / name).read_bytes() == (hf_models["llama"] / name).read_bytes()
    assert not any(ckpt.root.glob("*.safetensors"))


def test_dtype_cast_to_bfloat16_records_it_in_config(hf_models, tmp_path):
    ckpt = convert(hf_models["gpt2"], tmp_path / "out", dtype="bfloat16")
    source = source_state_dict(hf_models["gpt2"])
    for name, expected in source.items():
        entry = ckpt.resolve(name)
        assert entry.dtype == "bfloat16"
        assert same_bits(read_raw(ckpt, entry), expected.to(torch.bfloat16)), name
        with h5py.File(ckpt.partitions[entry.partition].path, "r", locking=False) as f:
            assert f[entry.name].dtype == np.uint8  # HDF5 has no bfloat16: raw bytes + attribute
    config = json.loads((ckpt.root / "config.json").read_text())
    assert "bfloat16" in {config.get("dtype"), config.get("torch_dtype")}
    assert ckpt.model["dtype"] == "bfloat16"
    ckpt.verify_files()


def test_existing_output_is_an_error_unless_overwrite(hf_models, tmp_path):
    out = tmp_path / "out"
    convert(hf_models["llama"], out, partitions=1)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(OutputExists, match="--overwrite"):
        convert(hf_models["llama"], out)
    assert (out / "manifest.json").read_bytes() == before
    ckpt = convert(hf_models["llama"], out, partitions=2, overwrite=True)
    assert len(ckpt.partitions) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_mid_conversion_leaves_nothing_behind(hf_models, tmp_path, monkeypatch):
    real_write = converter_module.write_partition
    calls = []

    def failing_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(converter_module, "write_partition", failing_write)
    with pytest.raises(CheckpointError, match="No space left"):
        convert(hf_models["llama"], tmp_path / "out", partitions=2)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_conversion_keeps_the_old_output(hf_models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(hf_models["gpt2"], out)
    before = read_checkpoint(out).manifest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(converter_module, "write_index", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_models["llama"], out, overwrite=True)
    assert read_checkpoint(out).manifest == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------------- bad input


def test_missing_source_folder(tmp_path):
    with pytest.raises(InvalidSource, match="no such folder"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_folder_without_weights(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(InvalidSource, match="has no weights"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(hf_models, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((hf_models["llama"] / "model.safetensors").read_bytes())
    with pytest.raises(InvalidSource, match="config.json"):
        convert(hf, tmp_path / "out")


@pytest.mark.parametrize("payload", [
    b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}",  # header is not JSON
    struct.pack("<Q", 1 << 40) + b"{}",  # header length beyond the file
    b"abc",  # shorter than the length prefix
])
def test_corrupt_safetensors_header_names_the_file(tmp_path, payload):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(payload)
    with pytest.raises(InvalidSource, match="model.safetensors"):
        convert(hf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_truncated_safetensors_names_the_file(hf_models, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    data = (hf_models["llama"] / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidSource, match="model.safetensors"):
        convert(hf, tmp_path / "out")


@pytest.mark.parametrize("payload", [b"this is not a pickle", b"PK\x03\x04 broken zip"])
def test_bin_that_fails_to_load_names_the_file(tmp_path, payload):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(InvalidSource, match="pytorch_model.bin"):
        convert(hf, tmp_path / "out")


def test_bin_with_non_tensor_values_is_rejected(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    torch.save({"weight": torch.ones(2), "step": 3}, hf / "pytorch_model.bin")
    with pytest.raises(InvalidSource, match="not a tensor"):
        convert(hf, tmp_path / "out")


def test_sharded_index_naming_a_missing_shard(hf_models, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(hf_models["sharded"], hf)
    shard = sorted(hf.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(InvalidSource, match=shard.name):
        convert(hf, tmp_path / "out")


def test_output_inside_the_source_is_refused(hf_models):
    with pytest.raises(CheckpointError, match="must not be the source"):
        convert(hf_models["llama"], hf_models["llama"] / "converted")
    assert not (hf_models["llama"] / "converted").exists()



@pytest.mark.parametrize("arch", ["sharded", "sharded_bin"])
def test_sharded_sources_record_every_shard(arch, hf_models, converted):
    ckpt = read_checkpoint(converted[arch])
    shards = sorted(p.name for p in hf_models[arch].iterdir() if p.suffix in (".safetensors", ".bin"))
    assert len(shards) == 3
    assert ckpt.manifest["source"]["files"] == shards


@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_parameter_is_stored_or_aliased(arch, hf_models, converted):
    # What a loader needs: each name of the model's state_dict can be filled from the checkpoint.
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_models[arch]))
    ckpt = read_checkpoint(converted[arch])
    expected = set(model.state_dict(keep_vars=True))
    assert expected <= set(ckpt.tensors) | set(ckpt.aliases)
    stored_twice = [n for n in ckpt.tensors if n in ckpt.aliases]
    assert not stored_twice

def test_progress_bar_counts_bytes_on_stderr(hf_models, tmp_path, capsys):
    ckpt = convert(hf_models["gpt2"], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "converting gpt2" in err and "100%" in err
    assert ckpt.model["tensor_bytes"] == sum(e.nbytes for e in ckpt.tensors.values())
