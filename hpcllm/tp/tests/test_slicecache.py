"""Slice copies (hpcllm.tp.slicecache): a rank's slices kept contiguously on its node, read in one request per
tensor, verified with the origin's strip hashes; what a copy lacks comes from the origin."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from hpcllm.checkpoint import ChecksumMismatch, TruncatedFile, read_checkpoint
from hpcllm.checkpoint.slicehashes import read_slice_hashes
from hpcllm.tp.plan import rank_slices
from hpcllm.tp.reader import read_slices
from hpcllm.tp.slicecache import (SLICES_DATA, manifest_fingerprint, usable_slice_copy, verify_slice_copy,
                                  write_slice_copy)


def _own(root, degree, rank, **options):
    ckpt = read_checkpoint(root)
    return ckpt, rank_slices(ckpt, AutoConfig.from_pretrained(root), degree, rank, **options)[0]


def _copy(root, tmp_path, degree, rank):
    dest = tmp_path / f"r{rank}"
    dest.mkdir()
    return write_slice_copy(root, degree, rank, dest)


def test_each_rank_reads_its_slices_from_its_copy_one_read_per_piece_and_gets_the_same_tensors(wide_llama, tmp_path):
    degree = 2
    ckpt = read_checkpoint(wide_llama)
    hashes = read_slice_hashes(ckpt)
    rowwise = {n for n in ckpt.tensors if n.endswith(("o_proj.weight", "down_proj.weight"))}
    for rank in range(degree):
        copy = _copy(wide_llama, tmp_path, degree, rank)
        _, own = _own(wide_llama, degree, rank)
        from_origin, origin_stats = read_slices(ckpt, own, hashes)
        per_row, per_row_stats = read_slices(ckpt, [s for s in own if s.stored in rowwise], hashes, gap_bytes=0)
        from_copy, stats = read_slices(ckpt, own, hashes, local=copy)
        assert from_copy.keys() == from_origin.keys()
        assert all(torch.equal(from_copy[n], from_origin[n]) for n in from_origin)
        # everything from the copy: one read per tensor piece, nothing from the origin's data files
        assert stats.reads == stats.cache_reads == len(own)
        share = sum(t.numel() * t.element_size() for t in from_copy.values())
        assert share <= stats.bytes_read <= share + 4096 * len(own)
        # the row-parallel (dim-1) slices: exactly their share, one read each, where the origin needs one read per
        # row to read that little
        dim1 = [s for s in own if s.stored in rowwise]
        dim1_share = sum(from_copy[s.name].numel() * 4 for s in dim1)
        _, dim1_stats = read_slices(ckpt, dim1, hashes, local=copy)
        assert dim1_stats.reads == len(dim1) and dim1_stats.bytes_read == dim1_share
        assert per_row_stats.reads >= sum(ckpt.tensors[s.stored].shape[0] for s in dim1)
        assert origin_stats.bytes_read > stats.bytes_read  # coalesced origin reads take the dim-1 tensors whole


def test_a_copy_serves_what_it_holds_and_the_origin_the_rest(tp_llama, tmp_path):
    ckpt = read_checkpoint(tp_llama)
    hashes = read_slice_hashes(ckpt)
    copy = _copy(tp_llama, tmp_path, 2, 1)  # rank 1's copy: no replicated tensors (rank 0 broadcasts them)
    _, own = _own(tp_llama, 2, 1, bcast_max_bytes=0)  # a load that has every rank read the replicated ones
    tensors, stats = read_slices(ckpt, own, hashes, local=copy)
    expected, _ = read_slices(ckpt, own, hashes)
    assert all(torch.equal(tensors[n], expected[n]) for n in expected)
    assert 0 < stats.cache_reads < stats.reads and stats.cache_bytes < stats.bytes_read


def test_a_corrupt_copy_is_named_and_a_copy_of_another_rank_or_version_is_not_used(tp_llama, tmp_path):
    copy = _copy(tp_llama, tmp_path, 2, 0)
    fingerprint = manifest_fingerprint(tp_llama)
    assert usable_slice_copy(copy.root, 2, 0, fingerprint) == copy
    assert usable_slice_copy(copy.root, 2, 1, fingerprint) is None
    assert usable_slice_copy(copy.root, 2, 0, "0" * 16) is None
    assert usable_slice_copy(tmp_path / "absent", 2, 0, fingerprint) is None
    verify_slice_copy(tp_llama, copy.root)

    piece = copy.pieces[next(k for k in copy.pieces if k[0] == "model.layers.1.mlp.down_proj.weight")]
    with open(copy.root / SLICES_DATA, "r+b") as f:
        f.seek(piece.offset + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ChecksumMismatch, match=r"slices\.bin: tensor model\.layers\.1\.mlp\.down_proj\.weight strip "
                                               r"\d+/\d+ along dim 1 is corrupt"):
        verify_slice_copy(tp_llama, copy.root)
    ckpt, own = _own(tp_llama, 2, 0)
    with pytest.raises(ChecksumMismatch, match="slices.bin"):
        read_slices(ckpt, own, read_slice_hashes(ckpt), local=copy)


def test_a_copy_cut_short_is_named_with_where_it_ends(tp_llama, tmp_path):
    """A slices.bin that ends early (the node's disk filled up, a partial restore): the load and the cache's check
    failed with 'BufferError: cannot close exported pointers exist', which names neither the copy nor the cause."""
    import os

    copy = _copy(tp_llama, tmp_path, 2, 1)
    data = copy.root / SLICES_DATA
    os.truncate(data, data.stat().st_size // 2)
    ckpt, own = _own(tp_llama, 2, 1)

    with pytest.raises(TruncatedFile, match=rf"{data}: ends at byte \d+"):
        read_slices(ckpt, own, read_slice_hashes(ckpt), local=copy)
    with pytest.raises(TruncatedFile, match=rf"{data}: ends at byte \d+"):
        verify_slice_copy(tp_llama, copy.root)


def test_the_copy_of_every_rank_together_is_the_model(tp_llama, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    original = load_file(tiny_llama_dir / "model.safetensors")
    ckpt = read_checkpoint(tp_llama)
    hashes = read_slice_hashes(ckpt)
    shards = []
    for rank in range(2):
        copy = _copy(tp_llama, tmp_path, 2, rank)
        _, own = _own(tp_llama, 2, rank, bcast_max_bytes=0)
        shards.append(read_slices(ckpt, own, hashes, local=copy)[0])
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(torch.cat([shards[0][down], shards[1][down]], dim=1), original[down])


def test_the_plan_of_a_slice_copy_load_is_what_the_load_reads(tp_llama, tmp_path):
    from hpcllm.tp.mpiload import rank_read_plans

    ckpt = read_checkpoint(tp_llama)
    hashes = read_slice_hashes(ckpt)
    for plan in rank_read_plans(tp_llama, 2):
        _, own = _own(tp_llama, 2, plan.rank)
        _, from_origin = read_slices(ckpt, own, hashes)
        _, from_copy = read_slices(ckpt, own, hashes, local=_copy(tp_llama, tmp_path, 2, plan.rank))
        assert plan.total == (from_origin.bytes_read, from_origin.reads)
        assert plan.slice_copy == (from_copy.bytes_read, from_copy.reads)
