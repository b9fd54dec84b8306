"""Per-rank slice plans and slice reads on one process (the MPI protocol is in test_mpirun_tp.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoConfig

from hpcllm.checkpoint import ChecksumMismatch, InvalidManifest, TruncatedFile, read_checkpoint
from hpcllm.checkpoint.cli import checkpoint as checkpoint_cli
from hpcllm.tp.cli import tp as tp_cli
from hpcllm.checkpoint.slicehashes import read_slice_hashes, strip_count
from hpcllm.tp.plan import TensorParallelError, check_degree, module_plan, slice_plan
from hpcllm.tp.reader import read_slices


def _slices(ckpt, degree: int, rank: int):
    config = AutoConfig.from_pretrained(ckpt.root)
    shapes = {name: entry.shape for name, entry in ckpt.tensors.items()}
    return slice_plan(shapes, ckpt.aliases, module_plan(config), degree, rank)


def _read(root: Path, degree: int, rank: int, **options):
    ckpt = read_checkpoint(root)
    return read_slices(ckpt, _slices(ckpt, degree, rank), read_slice_hashes(ckpt), **options)


def test_split_dimensions_come_from_the_transformers_plan(tp_llama):
    dims = {s.name: s.dim for s in _slices(read_checkpoint(tp_llama), 2, 0)}
    layer = "model.layers.0."
    assert {n: dims[layer + n] for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                                         "mlp.up_proj.weight")} == dict.fromkeys(
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight"), 0)
    assert dims[layer + "self_attn.o_proj.weight"] == dims[layer + "mlp.down_proj.weight"] == 1
    assert dims["lm_head.weight"] == 0
    assert dims[layer + "input_layernorm.weight"] is None and dims["model.norm.weight"] is None
    assert dims["model.embed_tokens.weight"] is None  # transformers 5's Llama plan replicates the embedding


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_the_ranks_slices_put_together_are_the_checkpoint(tp_llama, tiny_llama_dir, degree):
    original = load_file(tiny_llama_dir / "model.safetensors")
    per_rank = [_read(tp_llama, degree, rank)[0] for rank in range(degree)]
    plan = {s.name: s.dim for s in _slices(read_checkpoint(tp_llama), degree, 0)}
    for name, tensor in original.items():
        dim = plan[name]
        if dim is None:
            assert all(torch.equal(shard[name], tensor) for shard in per_rank), name
        else:
            assert all(shard[name].shape[dim] == tensor.shape[dim] // degree for shard in per_rank)
            assert torch.equal(torch.cat([shard[name] for shard in per_rank], dim=dim), tensor), name


def test_a_corrupt_byte_fails_only_the_rank_that_holds_it(tp_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tp_llama, broken)
    ckpt = read_checkpoint(broken)
    entry = ckpt.tensors["model.layers.1.self_attn.q_proj.weight"]  # [64, 64] float32: rank 1 holds rows 32..63
    with open(ckpt.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + 40 * 64 * 4 + 8)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))

    _read(broken, 2, 0)  # rank 0's slices do not contain the byte
    with pytest.raises(ChecksumMismatch, match=r"model\.layers\.1\.self_attn\.q_proj\.weight strip 40/64 along "
                                               r"dim 0 is corrupt"):
        _read(broken, 2, 1)


def test_a_data_file_cut_short_is_named_with_where_it_ends(tp_llama, tmp_path):
    """A data file that ends early (an interrupted copy): the rank's load failed with 'BufferError: cannot close
    exported pointers exist' instead of the read's own error (the span's buffer was closed while the error's
    traceback still held a view of it), so no rank said which file was short."""
    short = tmp_path / "short"
    shutil.copytree(tp_llama, short)
    data = read_checkpoint(short).partitions[0].path
    os.truncate(data, data.stat().st_size // 2)

    with pytest.raises(TruncatedFile, match=rf"{data}: ends at byte \d+, expected at least \d+ bytes"):
        _read(short, 2, 1)


def test_a_checkpoint_without_slice_hashes_is_refused_until_they_are_added(tp_llama, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tp_llama, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["slice_hashes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "slice-hashes.json").unlink()
    assert read_checkpoint(old).metadata_files == ["manifest.json", "index.json"]

    with pytest.raises(InvalidManifest, match="hpcllm checkpoint add-slice-hashes"):
        _read(old, 2, 0)
    result = CliRunner().invoke(checkpoint_cli, ["add-slice-hashes", str(old)])
    assert result.exit_code == 0, result.output
    assert "slice-hashes.json" in read_checkpoint(old).metadata_files
    tensors, stats = _read(old, 2, 0)
    assert stats.strips_verified > 0 and tensors["lm_head.weight"].shape == (512, 64)


def test_a_tampered_slice_hash_file_is_refused(tp_llama, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tp_llama, copy)
    data = (copy / "slice-hashes.json").read_bytes()
    (copy / "slice-hashes.json").write_bytes(data.replace(b'"strips":64', b'"strips":32', 1))
    with pytest.raises(ChecksumMismatch, match="slice-hashes.json: does not match"):
        read_slice_hashes(read_checkpoint(copy))


def test_bytes_read_per_rank_are_its_share_of_the_split_tensors(wide_llama):
    ckpt = read_checkpoint(wide_llama)
    plan = {s.name: s.dim for s in _slices(ckpt, 2, 0)}
    split = sum(e.nbytes for n, e in ckpt.tensors.items() if plan[n] is not None)
    replicated = sum(e.nbytes for n, e in ckpt.tensors.items() if plan[n] is None)
    assert split > 10 * replicated  # the model is mostly split tensors
    for rank in (0, 1):
        # Per-row reads (no coalescing): dim-1 shares of a whole page each are read alone.
        _, stats = _read(wide_llama, 2, rank, gap_bytes=0)
        share = split // 2 + replicated
        assert share <= stats.bytes_read <= share + 4096 * len(ckpt.tensors), (rank, stats)
        assert stats.bytes_read / ckpt.total_bytes < 0.56
        # Coalesced (the default): far fewer reads; the dim-1 tensors are read whole.
        _, coalesced = _read(wide_llama, 2, rank)
        assert coalesced.reads < stats.reads / 50
        assert coalesced.bytes_read < 0.75 * ckpt.total_bytes


@pytest.mark.parametrize("config_text", ["{broken", None, '{"model_type": "no-such-model"}'])
def test_the_plan_of_a_checkpoint_whose_config_cannot_be_read_names_the_file(tp_llama, tmp_path, config_text):
    """`hpcllm tp plan` on a checkpoint whose config.json is damaged, missing or of a model transformers does not
    know ended in transformers' OSError / ValueError traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(tp_llama, broken)
    if config_text is None:
        (broken / "config.json").unlink()
    else:
        (broken / "config.json").write_text(config_text)

    result = CliRunner().invoke(tp_cli, ["plan", str(broken), "--degree", "2"])

    assert result.exit_code != 0 and isinstance(result.exception, TensorParallelError), result.output
    assert str(result.exception).startswith(f"cannot read {broken / 'config.json'} to check tensor_parallel = 2: ")


def test_strip_counts_are_powers_of_two_up_to_64():
    assert [strip_count(n) for n in (1, 3, 4, 96, 128, 1024, 11008)] == [1, 1, 4, 32, 64, 64, 64]


def test_a_degree_that_does_not_split_the_model_names_every_number():
    config = AutoConfig.for_model("llama", num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024,
                                  vocab_size=1000, hidden_size=384)
    with pytest.raises(TensorParallelError) as error:
        check_degree(config, 4)
    assert str(error.value) == (
        "tensor_parallel = 4 does not fit model type 'llama': attention heads (num_attention_heads) = 6 is not "
        "divisible by 4; KV heads (num_key_value_heads) = 2 is not divisible by 4")
    check_degree(config, 2)
    with pytest.raises(TensorParallelError, match="no tensor-parallel plan in transformers"):
        check_degree(AutoConfig.for_model("gpt2"), 2)


def test_a_parameter_with_a_row_per_head_that_the_plan_keeps_whole_is_refused():
    """Cohere with use_qk_norm (Command R+): q_norm/k_norm weights are [heads, head_dim] and transformers' plan does
    not split them, so every rank's first forward failed on the shapes; the degree check names them instead."""
    config = AutoConfig.for_model("cohere", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, use_qk_norm=True)
    with pytest.raises(TensorParallelError) as error:
        check_degree(config, 2)
    assert str(error.value) == (
        "tensor_parallel = 2 does not fit model type 'cohere': model.layers.*.self_attn.k_norm.weight holds one row "
        "per head ([2, 16]) but its plan keeps it whole on every rank; model.layers.*.self_attn.q_norm.weight holds "
        "one row per head ([4, 16]) but its plan keeps it whole on every rank")
    config.use_qk_norm = False
    check_degree(config, 2)


def test_planned_reads_match_what_the_ranks_read_and_inspect_shows_them(tp_llama):
    from hpcllm.tp.mpiload import estimate_rank_reads
    from hpcllm.tp.plan import rank_slices

    ckpt = read_checkpoint(tp_llama)
    config = AutoConfig.from_pretrained(tp_llama)
    planned = estimate_rank_reads(tp_llama, 2)
    for rank in (0, 1):
        own, _ = rank_slices(ckpt, config, 2, rank)
        _, stats = read_slices(ckpt, own, read_slice_hashes(ckpt))
        assert planned[rank] == (stats.bytes_read, stats.reads)
    assert planned[1][0] < planned[0][0]  # rank 0 also reads the replicated tensors it broadcasts

    result = CliRunner().invoke(tp_cli, ["plan", str(tp_llama), "--degree", "2"])
    assert result.exit_code == 0, result.output
    assert f"tensor_parallel = 2: rank 1 reads {planned[1][0] / 1024:.1f} KiB" in result.output
    # the dim-1 (rowwise) reads by themselves: each row share is 256 bytes, within one page with its neighbour's, so
    # every byte of those tensors is read (2.0x) even read by read (--gap-bytes 0); coalesced, more around them
    assert "its share of 48.0 KiB" in result.output
    per_row = CliRunner().invoke(tp_cli, ["plan", str(tp_llama), "--degree", "2", "--gap-bytes", "0"])
    assert "dim 1 (rowwise) 96.0 KiB in 4 read(s), 2.0x its share of 48.0 KiB" in per_row.output, per_row.output
    assert "from its slice copy (hpcllm cache warm --tensor-parallel 2): 272.0 KiB in 15 read(s)" in result.output
    refused = CliRunner().invoke(tp_cli, ["plan", str(tp_llama), "--degree", "4"])
    assert refused.exit_code != 0 and "KV heads (num_key_value_heads) = 2 is not divisible by 4" in str(
        refused.exception)
