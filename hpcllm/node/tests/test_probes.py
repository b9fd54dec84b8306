"""Tier probes (small sizes) and GPU discovery from what Slurm gives a job."""

from __future__ import annotations

import os

import pytest

from hpcllm.node.gpus import detect_gpus
from hpcllm.node.probes import measure_tiers, probe_sharedfs

MiB = 1 << 20


def test_measure_tiers_reports_positive_bandwidths_and_leaves_no_probe_file(tmp_path):
    m = measure_tiers(tmp_path / "nvme", tmp_path / "models", 4 * MiB, 4 * MiB, gpu_count=0)
    assert m.nvme.read_gbps > 0 and m.nvme.bytes == 4 * MiB
    assert m.nvme.mode in ("odirect", "buffered")
    assert m.nvme.mode == "odirect" or m.nvme.note  # a fallback always says why
    assert m.sharedfs.read_gbps > 0 and m.sharedfs.mode == "buffered"
    assert m.dram.read_gbps > 0 and m.dram.mode == "memcpy"
    assert m.h2d is None  # no GPU asked for
    assert list((tmp_path / "nvme").iterdir()) == [] and list((tmp_path / "models").iterdir()) == []


def test_read_only_models_folder_is_measured_by_reading_an_existing_file(tmp_path, monkeypatch):
    import errno

    from hpcllm.node import probes

    models = tmp_path / "models"
    models.mkdir()
    (models / "data.bin").write_bytes(os.urandom(2 * MiB))

    def read_only(path, size):  # what a read-only mount answers (root ignores chmod, so simulate the mount)
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(probes, "_write_probe_file", read_only)
    result = probe_sharedfs(models, 4 * MiB)
    assert result.read_gbps > 0 and result.bytes == 2 * MiB and "not writable" in result.note


def test_unreadable_shared_fs_is_left_out_rather_than_invented(tmp_path):
    missing_parent = tmp_path / "file"
    missing_parent.write_text("x")
    assert probe_sharedfs(missing_parent / "models", MiB) is None


@pytest.mark.parametrize("env, names, source", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ("0", "1"), "CUDA_VISIBLE_DEVICES"),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_JOB_GPUS": "2,3"}, ("2", "3"), "CUDA_VISIBLE_DEVICES"),
    ({"SLURM_JOB_GPUS": "5"}, ("5",), "SLURM_JOB_GPUS"),
    ({"SLURM_GPUS_ON_NODE": "3"}, ("0", "1", "2"), "SLURM_GPUS_ON_NODE"),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, (), "none"),
    ({}, (), "none"),
])
def test_gpus_from_slurm_environment(env, names, source):
    inv = detect_gpus(env, use_nvml=False)
    assert (inv.names, inv.source, inv.count) == (names, source, len(names))


def test_a_worker_sees_only_its_gpus():
    inv = detect_gpus({"CUDA_VISIBLE_DEVICES": "4,6,7"}, use_nvml=False)
    assert inv.visible_devices([0, 2]) == "4,7"


@pytest.mark.gpu
def test_host_to_device_bandwidth_on_a_real_gpu():
    from hpcllm.node.probes import h2d_bandwidth

    result = h2d_bandwidth(4 * MiB)
    assert result is not None and result.read_gbps > 0 and result.mode == "pinned"
