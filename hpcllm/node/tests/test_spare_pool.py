"""The host pool a spare worker reserves: sized from the checkpoints the node caches, capped by the config."""

from __future__ import annotations

from types import SimpleNamespace

from hpcllm.config import Config
from hpcllm.node.gpus import GpuInventory
from hpcllm.node.workers import WorkerManager

GB = 10**9


class FakeCache:
    def __init__(self, copies):
        self.copies = copies

    def list(self):
        return self.copies


def copy(nbytes, tensor_parallel=None):
    return SimpleNamespace(bytes=nbytes, tensor_parallel=tensor_parallel)


def manager(tmp_path, cache, cap_gb):
    config = Config()
    config.node.spare_host_pool_gb = cap_gb
    return WorkerManager(config, tmp_path / "run", GpuInventory((), "none"), cache=cache)


def test_spare_pool_is_the_largest_cached_checkpoint_within_the_cap(tmp_path):
    cache = FakeCache([copy(2 * GB), copy(5 * GB), copy(40 * GB, tensor_parallel=4)])  # a TP slice: not CPU-loaded
    assert manager(tmp_path, cache, cap_gb=8.0)._spare_pool_bytes() == 5 * GB
    assert manager(tmp_path, cache, cap_gb=3.0)._spare_pool_bytes() == 3 * GB
    assert manager(tmp_path, cache, cap_gb=0.0)._spare_pool_bytes() == 0  # off
    assert manager(tmp_path, FakeCache([]), cap_gb=8.0)._spare_pool_bytes() == 0  # nothing cached yet
    assert manager(tmp_path, None, cap_gb=8.0)._spare_pool_bytes() == 0
