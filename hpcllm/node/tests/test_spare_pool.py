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


def test_spare_faults_its_pool_in_the_background_and_an_assignment_never_waits_for_it(monkeypatch):
    import threading

    from hpcllm.store import memory
    from hpcllm.store.memory import HostBufferPool
    from hpcllm.worker.spare import BackgroundReservation

    pool = HostBufferPool()
    monkeypatch.setattr(memory, "_default_pool", pool)
    monkeypatch.setenv(memory.HOST_POOL_ENV, str(32 << 20))
    done = BackgroundReservation().start()
    done.thread.join()  # the spare waited long enough: the whole pool is there for its load
    assert done.finish() >= 32 << 20 and pool.prefaulted_for([32 << 20])

    pool = HostBufferPool()
    monkeypatch.setattr(memory, "_default_pool", pool)
    in_step, release = threading.Event(), threading.Event()
    real_populate = memory.HostBuffer.populate

    def slow_populate(buffer, start=0, end=None):  # faulting in takes long (huge pages on a busy VM)
        in_step.set()
        release.wait()
        real_populate(buffer, start, end)

    monkeypatch.setattr(memory.HostBuffer, "populate", slow_populate)
    monkeypatch.setattr(memory, "RESERVE_STEP", 4 << 20)  # the 32 MiB pool takes several steps
    early = BackgroundReservation().start()
    assert in_step.wait(10)
    threading.Timer(0.2, release.set).start()  # the step under way ends; the assignment came meanwhile
    assert early.finish() == 0  # stopped after that step: nothing reserved, the load uses fresh memory
    assert pool.stats().arena_bytes == 0


def test_a_spare_with_a_model_process_reserves_its_pool_in_shared_memory(monkeypatch):
    """Its load goes into shared memory (the model process takes the weights without a copy): a plain arena could
    not serve it, so the spare reserves a shared one; without a model process the arena stays plain memory."""
    from hpcllm.store import memory
    from hpcllm.store.memory import HostBufferPool, SharedHostBuffer
    from hpcllm.worker.spare import MODEL_PROCESS_ENV, BackgroundReservation

    monkeypatch.setenv(memory.HOST_POOL_ENV, str(8 << 20))
    for flag, shared in (("1", True), ("0", False)):
        pool = HostBufferPool()
        monkeypatch.setattr(memory, "_default_pool", pool)
        monkeypatch.setenv(MODEL_PROCESS_ENV, flag)
        reservation = BackgroundReservation().start()
        reservation.thread.join()
        assert reservation.finish() >= 8 << 20
        assert pool.prefaulted_for([8 << 20], shared=True) is shared and pool.prefaulted_for([8 << 20])
        assert isinstance(pool.acquire(8 << 20, shared=shared), SharedHostBuffer) is shared
