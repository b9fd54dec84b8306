"""Converting tiny HF models: bit-exact round trips through raw offsets, aliases, side files, atomic publish, errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
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
from hpcllm.store.tests.tmpfs import mounted_tmpfs

ARCHS = ["llama", "gpt2", "qwen2", "opt", "sharded", "bin", "sharded_bin"]
LLAMA_CONFIG = '{"model_type": "llama"}'  # for sources whose weights are what is wrong


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


def test_identical_untied_bytes_are_not_aliased(hf_models, converted):
    # Every norm weight of a dev model is all ones; untied, each stays its own tensor: only real ties become aliases.
    norms = [name for name in source_state_dict(hf_models["llama"]) if name.endswith("layernorm.weight")]
    assert len(norms) > 1
    ckpt = read_checkpoint(converted["llama"])
    assert ckpt.aliases == {} and set(norms) <= set(ckpt.tensors)


def test_side_files_are_copied_with_checksums(hf_models, converted):
    ckpt = read_checkpoint(converted["llama"])
    copied = {s.file for s in ckpt.side_files}
    source_files = {p.name for p in hf_models["llama"].iterdir()
                    if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".index.json"))}
    assert "config.json" in copied and source_files == copied
    for name in copied:
        assert (ckpt.root / name).read_bytes() == (hf_models["llama"] / name).read_bytes()
    assert not any(ckpt.root.glob("*.safetensors"))


def test_weights_of_other_frameworks_are_not_copied_as_side_files(hf_models, tmp_path):
    # A hub snapshot of openai-community/gpt2 holds its weights for rust-bert and TF Lite too, each as large as
    # the model: they were copied into the checkpoint (and every node's cache) as side files.
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["gpt2"], hf)
    others = ["rust_model.ot", "64.tflite", "64-fp16.tflite", "tf_model.h5", "flax_model.msgpack", "model.onnx"]
    for name in others:
        (hf / name).write_bytes(b"weights of another framework")
    ckpt = convert(hf, tmp_path / "out")
    assert not {s.file for s in ckpt.side_files} & set(others)
    assert not [name for name in others if (ckpt.root / name).exists()]


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
    (tmp_path / "empty").mkdir()
    assert convert(hf_models["llama"], tmp_path / "empty", overwrite=True).tensors  # an empty folder is free too


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_checkpoint_published_meanwhile_into_the_same_folder_is_kept(hf_models, converted, tmp_path,
                                                                        monkeypatch, overwrite):
    """Two conversions into one folder: the one publishing second fails clearly and leaves nothing behind (with
    --overwrite it left the checkpoint it had swapped out in a hidden .out.replaced-* folder, as large as a
    checkpoint; without, the error was rename's 'Directory not empty')."""
    out = tmp_path / "out"
    if overwrite:
        convert(hf_models["gpt2"], out)
    real_rename = os.rename

    def other_conversion_publishes_first(src, dst):
        if Path(dst) == out and ".converting-" in Path(src).name:
            shutil.copytree(converted["llama"], out)
        return real_rename(src, dst)

    monkeypatch.setattr(converter_module.os, "rename", other_conversion_publishes_first)
    with pytest.raises(OutputExists, match="something was put there while converting"):
        convert(hf_models["gpt2"], out, overwrite=overwrite)
    assert read_checkpoint(out).manifest == read_checkpoint(converted["llama"]).manifest
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("also_restoring", [False, True])
def test_overwrite_failing_to_publish_never_loses_the_old_checkpoint(hf_models, converted, tmp_path, monkeypatch,
                                                                      also_restoring):
    """Renaming the new checkpoint into place fails (EIO, ESTALE on a network FS): the old one goes back; when that
    fails too it is kept where it was swapped out to, and the error says where (both were deleted)."""
    out = tmp_path / "out"
    shutil.copytree(converted["llama"], out)
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".converting-" in Path(src).name or also_restoring and Path(src).name == "old":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_rename(src, dst)

    monkeypatch.setattr(converter_module.os, "rename", failing_rename)
    with pytest.raises(CheckpointError, match="Input/output error") as exc:
        convert(hf_models["gpt2"], out, overwrite=True)
    if also_restoring:
        kept = list(tmp_path.glob(".out.replaced-*/old"))
        assert len(kept) == 1 and str(kept[0]) in str(exc.value)
        assert not out.exists()
    else:
        kept = [out]
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert read_checkpoint(kept[0]).manifest == read_checkpoint(converted["llama"]).manifest
    read_checkpoint(kept[0]).verify_files()


def test_overwrite_racing_another_overwrite_that_swapped_the_old_one_out(hf_models, converted, tmp_path,
                                                                         monkeypatch):
    """Another --overwrite conversion moved the old checkpoint away between this one's check and its swap: out is
    free, so this one is published (it failed with rename's 'No such file or directory' naming a hidden folder)."""
    out = tmp_path / "out"
    shutil.copytree(converted["llama"], out)
    real_rename = os.rename

    def other_conversion_swaps_out_first(src, dst):
        if Path(src) == out and Path(dst).name == "old" and out.exists():
            real_rename(out, tmp_path / "swapped-out-by-the-other")
        return real_rename(src, dst)

    monkeypatch.setattr(converter_module.os, "rename", other_conversion_swaps_out_first)
    ckpt = convert(hf_models["gpt2"], out, overwrite=True)
    assert ckpt.manifest == read_checkpoint(out).manifest != read_checkpoint(converted["llama"]).manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "swapped-out-by-the-other"]


@pytest.mark.parametrize("make, why", [
    (lambda out: (out.mkdir(), (out / "thesis.tex").write_text("x")), "not a converted checkpoint"),
    (lambda out: out.write_text("x"), "not a folder"),
    (lambda out: out.symlink_to(out.parent), "symbolic link"),
    (lambda out: (out.mkdir(), (out / "thesis.tex").write_text("x"), (out / "manifest.json").write_text(
        json.dumps({"format": "hpcllm-checkpoint", "partitions": [{"file": "data-00000.h5"}]}))),
     r"not part of the checkpoint \(thesis.tex\)"),
])
def test_overwrite_never_replaces_what_a_conversion_did_not_make(hf_models, tmp_path, make, why):
    out = tmp_path / "out"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputExists, match=why):
        convert(hf_models["llama"], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_never_replaces_the_current_folder(hf_models, tmp_path, monkeypatch):
    out = convert(hf_models["llama"], tmp_path / "out").root
    monkeypatch.chdir(out)
    with pytest.raises(OutputExists, match="current folder"):
        convert(hf_models["llama"], ".", overwrite=True)
    read_checkpoint(out).verify_files()


def test_the_published_folder_is_readable_as_the_umask_allows(hf_models, tmp_path):
    old = os.umask(0o027)
    try:
        ckpt = convert(hf_models["llama"], tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ckpt.root.stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in ckpt.root.iterdir()} == {0o640}


@pytest.mark.parametrize("chunk_size", [1 << 40, 512 << 20])
def test_a_chunk_size_beyond_the_maximum_is_refused(hf_models, tmp_path, chunk_size):
    with pytest.raises(CheckpointError, match="multiple of 4096 from 4096 to 268435456"):
        convert(hf_models["llama"], tmp_path / "out", chunk_size=chunk_size)
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize("room", ["none", "half"])  # no room for HDF5's own metadata / for half the tensors
def test_a_disk_that_fills_up_is_a_clear_error_and_leaves_nothing(hf_models, tmp_path, room):
    """A full disk (or quota) while a data file is written: a CheckpointError saying so, no temporary folder left
    (a write failing inside HDF5 ended in h5py's RuntimeError traceback, or a segfault)."""
    weights = sum(p.stat().st_size for p in hf_models["llama"].glob("*.safetensors"))
    with mounted_tmpfs(tmp_path / "disk", "8k" if room == "none" else f"{weights // 2 >> 10}k") as disk:
        with pytest.raises(CheckpointError, match="No space left on device"):
            convert(hf_models["llama"], disk / "out")
        assert list(disk.iterdir()) == []


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


def test_a_killed_conversions_leftover_is_removed_by_the_next_one(hf_models, tmp_path):
    """SIGKILL (OOM, scancel) leaves the hidden temporary folder, as large as the checkpoint, on the shared FS."""
    out, started = tmp_path / "out", tmp_path / "started"
    script = f"""
import time
from pathlib import Path
from hpcllm.checkpoint import converter
def hang(*args, **kwargs):
    Path({str(started)!r}).touch()
    time.sleep(120)
converter.write_index = hang
converter.convert({str(hf_models["llama"])!r}, {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        while not started.exists():
            assert proc.poll() is None, "the conversion exited early"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    [killed] = [p.name for p in tmp_path.iterdir() if ".converting-" in p.name]
    # Not ours to remove: a live conversion here, and any on another host (its pid means nothing here).
    running = [f".out.converting-{os.getpid()}@{socket.gethostname()}.abc_12",
               f".out.converting-{proc.pid}@elsewhere.x1"]
    for name in running:
        (tmp_path / name).mkdir()
    convert(hf_models["llama"], out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != started.name) == sorted(running + ["out"])
    assert killed not in running


# ----------------------------------------------------------------------------------------------------- bad input


def test_missing_source_folder(tmp_path):
    with pytest.raises(InvalidSource, match="no such folder"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_folder_without_weights(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(LLAMA_CONFIG)
    with pytest.raises(InvalidSource, match="has no weights"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_converted_checkpoint_given_as_the_source_says_so(hf_models, converted, tmp_path):
    # Converting again (for another --dtype, say) is a likely slip: "has no weights" was wrong, it holds them.
    with pytest.raises(InvalidSource, match="is a converted hpcllm checkpoint already") as error:
        convert(converted["llama"], tmp_path / "out", dtype="bfloat16")
    assert str(hf_models["llama"]) in str(error.value)  # the folder to convert instead
    assert not (tmp_path / "out").exists()


def test_config_without_model_type_is_refused(hf_models, tmp_path):
    # Converted anyway, such a checkpoint failed in every loader with transformers' "Unrecognized model" traceback.
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["llama"], hf)
    config = json.loads((hf / "config.json").read_text())
    del config["model_type"]
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidSource, match='config.json: has no "model_type"; add .*"model_type": "llama"'):
        convert(hf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


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
    (hf / "config.json").write_text(LLAMA_CONFIG)
    (hf / "model.safetensors").write_bytes(payload)
    with pytest.raises(InvalidSource, match="model.safetensors"):
        convert(hf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_truncated_safetensors_names_the_file(hf_models, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(LLAMA_CONFIG)
    data = (hf_models["llama"] / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidSource, match="model.safetensors"):
        convert(hf, tmp_path / "out")


@pytest.mark.parametrize("payload", [b"this is not a pickle", b"PK\x03\x04 broken zip"])
def test_bin_that_fails_to_load_names_the_file(tmp_path, payload):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(LLAMA_CONFIG)
    (hf / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(InvalidSource, match="pytorch_model.bin"):
        convert(hf, tmp_path / "out")


def test_bin_with_non_tensor_values_is_rejected(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(LLAMA_CONFIG)
    torch.save({"weight": torch.ones(2), "step": 3}, hf / "pytorch_model.bin")
    with pytest.raises(InvalidSource, match="not a tensor"):
        convert(hf, tmp_path / "out")


@pytest.mark.parametrize("arch", ["llama", "bin", "sharded"])
def test_git_lfs_pointers_instead_of_weights_say_so(arch, hf_models, tmp_path):
    # A clone made without git-lfs: safetensors said "header too large", torch.load to retry with weights_only=False.
    hf = tmp_path / "hf"
    shutil.copytree(hf_models[arch], hf)
    weights = sorted(p for p in hf.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in weights:
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 2471645608\n")
    with pytest.raises(InvalidSource, match="is a Git LFS pointer, not the weights.*git lfs pull") as exc:
        convert(hf, tmp_path / "out")
    assert str(weights[0]) in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_a_git_lfs_pointer_among_the_side_files_says_so(hf_models, tmp_path):
    # tokenizer.json (and tokenizer.model) are LFS files in most hub repositories: the pointer was copied into the
    # checkpoint silently, and serving failed later on a tokenizer that is not one.
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["llama"], hf)
    (hf / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64
                                        + "\nsize 499723\n")
    with pytest.raises(InvalidSource, match="tokenizer.model: is a Git LFS pointer, not the file.*git lfs pull"):
        convert(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_index_naming_a_missing_shard(hf_models, tmp_path):
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
