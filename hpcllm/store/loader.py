"""load_model: a converted checkpoint -> a ready transformers model, from any tier, onto CPU or GPU(s).

    loaded = hpcllm.load_model("/var/tmp/hpcllm/nvme/llama", device="cpu")      # or "cuda:0", or a device_map
    model, tokenizer, stats = loaded                                            # LoadedModel unpacks
    stats.tier, stats.reader_mode, stats.seconds, stats.gbps

How the bytes travel (see docs/loader.md):
  * CPU target, file tier (disk / sharedfs): one page-aligned host buffer per partition (reused from a pool of
    pre-faulted buffers when possible); reader threads preadv (O_DIRECT on disk) straight into it while a thread
    faults fresh pages in ahead of them; the model's tensors are views of those buffers. No second copy.
  * CPU target, DRAM tier: the /dev/shm files are mapped copy-on-write and tensors are views of the mapping:
    nothing is read or copied, every process on the node shares the pages.
  * CPU target, shared_memory=True (the model goes to a model process): the host buffers are torch shared memory
    and every tier is read into them (no file mappings), so the model process gets the weights by fd, not a copy.
  * GPU (or device_map) target: reads go into a bounded ring of pinned staging slots, copied asynchronously on a
    dedicated CUDA stream into one device buffer per partition (and device); tensors are views of those.
Meanwhile the main thread builds the model skeleton (parameters on meta) and verifies each chunk's xxh3 as it
arrives. Any checkpoint problem raises a CheckpointError naming the file; no half-loaded model is returned.
"""

from __future__ import annotations

import functools
import gc
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hpcllm.checkpoint import ALIGNMENT, INDEX_FILE, Checkpoint, read_checkpoint
from hpcllm.checkpoint.layout import FLOATING_DTYPES
from hpcllm.errors import HpcllmError
from hpcllm.store.memory import HostBuffer, HostBufferPool, MappedFile, default_pool, populate_read, round_up
from hpcllm.store.pipeline import (DirectHostTarget, Pipeline, Placement, StagedTarget, packed_placement,
                                   plan_units, whole_partition_placement)
from hpcllm.store.readers import BUFFERED, CACHED_ENOUGH, FileReader, cached_fraction
from hpcllm.store.ring import DeviceRouter, HostCopyEngine, StagingRing, host_slot
from hpcllm.store.tee import LoadTee
from hpcllm.store.tiers import MMAP, TierSettings, detect_tier, memory_copy_threads, tier_settings
from hpcllm.store.tuning import ReadPlan, choose_read_plan, load_tuning
from hpcllm.store.verified import record_verified, verified_before

log = logging.getLogger(__name__)


class DeviceSpecError(HpcllmError):
    """The device / device_map argument cannot be honoured."""

    exit_code = 2


@dataclass
class LoadStats:
    """What one load did; `seconds` is checkpoint path -> ready model (tokenizer excluded)."""

    path: str
    tier: str
    reader_mode: str  # "odirect" | "buffered" | "mmap" (zero-copy views of /dev/shm or page-cache pages)
    devices: list[str]
    bytes: int
    seconds: float
    verified: bool  # every chunk's checksum was checked during this load
    threads: int
    zero_copy: bool
    verified_earlier: bool = False  # not re-checked: the files are unchanged since a load that checked them
    fallback_reason: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # open, config, skeleton, read, attach, tokenizer
    staging: dict[str, int] | None = None  # slots, slot_bytes, submitted, waits_for_copy (GPU / device_map)
    pipeline: dict[str, float] | None = None  # where a read load's time went (pipeline.PipelineStats); None: no reads
    pool_reused_bytes: int = 0  # destination bytes that came pre-faulted from the buffer pool
    request_bytes: int = 0  # bytes per read request (0: no reads, the files were mapped already in memory)
    read_plan: str = ""  # where the reader mode, threads and request size came from (probe / default / arguments)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gbps": self.gbps}


@dataclass
class LoadedModel:
    """A ready model (eval mode), its tokenizer (None if the checkpoint has none / not asked) and the load stats.

    Unpacks as `model, tokenizer, stats = load_model(...)`. The model's weights are views of memory this object
    tracks; `release()` hands that memory back to the buffer pool for the next load.
    """

    model: Any
    tokenizer: Any
    stats: LoadStats
    checkpoint: Checkpoint
    _host_buffers: list = field(default_factory=list, repr=False)
    _pool: HostBufferPool | None = field(default=None, repr=False)
    _device_buffers: list = field(default_factory=list, repr=False)  # one uint8 tensor per (partition, GPU)
    _tee_thread: threading.Thread | None = field(default=None, repr=False)  # writing the tee_into copy
    _mappings: list = field(default_factory=list, repr=False)  # MappedFile bases (zero-copy CPU loads)
    _populate_thread: threading.Thread | None = field(default=None, repr=False)  # faulting the mappings in
    _release_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # release() vs discard()
    _released: bool = field(default=False, repr=False)

    def wait_for_tee(self, timeout: float | None = None) -> bool:
        """Wait until the tee_into copy is written (it finishes after the load on CPU); True when it is done."""
        if self._tee_thread is not None:
            self._tee_thread.join(timeout)
            return not self._tee_thread.is_alive()
        return True

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.stats))

    def discard(self, ranges: list[tuple[int, int]]) -> int:
        """The model no longer reads these (address, length) byte ranges of its weights (e.g. the worker engine built
        fused, packed copies of them): hand the whole pages of those inside its host buffers or file mappings back
        to the OS. Ranges elsewhere (tensors with their own storage) are left alone. A tee_into copy still being
        written from the buffers, and the background populate of the mappings, are waited for first, in a thread.
        Returns the bytes that are (or will be) released.
        """
        picked = [(buffer, address, length) for address, length in ranges
                  for buffer in (*self._host_buffers, *self._mappings) if buffer.holds(address, length)]
        releasable = sum(len(range(-(-a // mmap.PAGESIZE), (a + n) // mmap.PAGESIZE)) * mmap.PAGESIZE
                         for _, a, n in picked)

        def discard_all() -> None:
            self.wait_for_tee()
            if self._populate_thread is not None:
                self._populate_thread.join()  # it would fault the released pages in again
            with self._release_lock:
                if not self._released:
                    for buffer, address, length in picked:
                        buffer.discard(address, length)

        if picked:
            if any(t is not None and t.is_alive() for t in (self._tee_thread, self._populate_thread)):
                threading.Thread(target=discard_all, name="hpcllm-discard", daemon=True).start()
            else:
                discard_all()
        return releasable

    def release(self) -> None:
        """Drop the model's weights (moved to meta) and return its host buffers to the pool for reuse.

        Only for the owner of the model: tensors taken from it before release would see the next model's bytes.
        Waits for a tee_into copy being written from those buffers first.
        """
        self.wait_for_tee()
        with self._release_lock:  # a discard() still waiting for the tee must not touch the buffers once pooled
            self._released = True
        if self.model is not None:
            self.model.to("meta")
            self.model = None
        if self._pool is not None:
            for buffer in self._host_buffers:
                self._pool.release(buffer)
        self._host_buffers = []
        self._device_buffers = []


def _gc_paused(func):
    """Run `func` with Python's cyclic garbage collector paused (restored after, also on errors).

    A load allocates a few thousand container objects (~300 modules, their dicts, tensors); each time the
    allocation count passes the GC threshold, a collection walks objects of the heap that torch + transformers
    make large (~350k objects): measured ~5 ms of a ~35 ms DRAM-tier load. The load creates no garbage cycles worth
    collecting meanwhile; the GC runs normally again once it returns.
    """

    @functools.wraps(func)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


@_gc_paused
def load_model(path, device: Any = "cpu", *, tier: str | None = None, verify: bool | None = None, dtype=None,
               tokenizer: bool = True, threads: int | None = None, unit_bytes: int | None = None,
               staging_slots: int | None = None, pool: HostBufferPool | None = None,
               staged: bool = False, tee_into: str | Path | None = None, read_tuning=None,
               shared_memory: bool = False) -> LoadedModel:
    """Load a converted checkpoint into a ready transformers model.

    path            converted checkpoint folder (any tier; DramTier.open(model_id) for the DRAM tier)
    device          "cpu", "cuda", "cuda:N", a torch.device, or a device_map {module prefix: device} ("" = rest)
    tier            "dram" | "disk" | "sharedfs"; default: detected from the filesystem type of `path`
    verify          check every chunk's xxh3 while reading; default: the tier's setting (DRAM: only if the folder
                    was not filled by DramTier, which verifies at fill time; disk: not if the files are unchanged
                    since a load that verified them, see hpcllm.store.verified). True always checks.
    dtype           torch dtype for floating weights; default "auto" like from_pretrained (config.json's dtype,
                    else the stored one). A dtype other than the stored one costs a conversion copy.
    tokenizer       also load the tokenizer from the checkpoint's side files (AutoTokenizer)
    threads, unit_bytes, staging_slots   override the tier's pipeline settings (threads / unit_bytes also override
                    the read tuning: unit_bytes is then the bytes per read request too)
    read_tuning     the node probe's read settings (hpcllm.store.tuning.ReadTuning or its JSON file); default
                    $HPCLLM_READ_TUNING, which the node agent sets for its workers. Without one: the tier defaults
    pool            host buffer pool for CPU targets (default: the process-wide pool)
    staged          route CPU loads through the staging ring too (the GPU path's machinery; for testing)
    tee_into        an empty folder: also write the bytes read there as a copy of the checkpoint (cache on load,
                    hpcllm.store.tee); a failed tee is logged and never fails the load
    shared_memory   CPU weights in torch shared memory (SharedHostBuffer), read from any tier (never views of a
                    file mapping), so pickling the model for another process (torch.multiprocessing: the worker's
                    model process) passes them by fd without copying. Weights converted to another dtype are
                    private memory (copied once more by that pickling). No effect on GPU weights.
    """
    started = time.perf_counter()
    ckpt = read_checkpoint(path)
    ckpt.check_files_present()
    tier_name = tier or detect_tier(ckpt.root)
    settings = tier_settings(tier_name).with_overrides(threads=threads, unit_bytes=unit_bytes,
                                                       staging_slots=staging_slots)
    verified_earlier = False
    if verify is None:
        verify = settings.verify or (settings.reader == MMAP and not _filled_by_dram_tier(ckpt.root))
        if verify and settings.trust_verified_record and verified_before(ckpt):
            verify, verified_earlier = False, True
    if verify:
        _verify_side_files(ckpt)
    device_of, devices = resolve_devices(device, ckpt)
    stored_dtypes = {name: ckpt.torch_dtype(entry) for name, entry in ckpt.tensors.items()}  # UnsupportedDtype now
    pool = pool or default_pool()
    phases = {"open": time.perf_counter() - started}

    host_target = devices == {"cpu"} and not staged
    prefaulted = host_target and pool.prefaulted_for([p.size for p in ckpt.partitions if p.size], shared_memory)
    plan = _read_plan(read_tuning, tier_name, settings, host_target, ckpt.root, threads, unit_bytes, prefaulted)
    if staging_slots is None:  # enough slots for every reader thread to hold one while copies drain the others
        settings = settings.with_overrides(staging_slots=max(settings.staging_slots, plan.threads + 2))
    tee = LoadTee(ckpt, tee_into) if tee_into is not None else None
    load = _Load(ckpt, settings, verify, device_of, devices, pool, staged, tee, plan, shared_memory)
    try:
        load.start()
        config_started = time.perf_counter()
        config = _load_config(ckpt.root)
        target_dtype = model_dtype(dtype, config, ckpt)
        from hpcllm.store.skeleton import cached_skeleton, import_model_code

        import_model_code(config)
        # For a process's first model these two import transformers' modeling stack (seconds); ~2 ms later on.
        phases["config"] = time.perf_counter() - config_started
        skeleton_started = time.perf_counter()
        model = cached_skeleton(config, target_dtype)
        phases["skeleton"] = time.perf_counter() - skeleton_started
        bases = load.finish()
    except BaseException:
        load.abort()
        if tee is not None:
            tee.close()
        raise
    phases["read"] = load.read_seconds

    attach_started = time.perf_counter()
    try:
        from hpcllm.store.skeleton import loaded_dtypes

        target_dtypes = loaded_dtypes(model, target_dtype)
        tensors = _tensor_views(ckpt, load.placement, bases, stored_dtypes, target_dtypes, device_of)
        _attach(model, tensors, ckpt, device_of, devices)
    except BaseException:
        load.release_buffers()
        if tee is not None:
            tee.close()
        raise
    phases["attach"] = time.perf_counter() - attach_started
    seconds = time.perf_counter() - started
    tee_thread = load.finish_tee() if tee is not None else None
    load.populate_in_background()
    if verify and settings.trust_verified_record:
        record_verified(ckpt)

    stats = LoadStats(path=str(ckpt.root), tier=tier_name, reader_mode=load.reader_mode, devices=sorted(devices),
                      bytes=ckpt.total_bytes, seconds=seconds, verified=verify, verified_earlier=verified_earlier,
                      threads=load.threads,
                      zero_copy=load.zero_copy, fallback_reason=load.fallback_reason, phases=phases,
                      staging=load.staging_stats(), pipeline=load.pipeline_stats(),
                      pool_reused_bytes=load.pool_reused_bytes,
                      request_bytes=load.request_bytes, read_plan=plan.source)
    loaded = LoadedModel(model=model, tokenizer=None, stats=stats, checkpoint=ckpt, _host_buffers=load.host_buffers,
                         _pool=pool, _device_buffers=load.device_buffers(), _tee_thread=tee_thread,
                         _mappings=load.mappings(), _populate_thread=load.populate_thread)
    if tokenizer:
        tokenizer_started = time.perf_counter()
        try:
            loaded.tokenizer = _load_tokenizer(ckpt.root)
        except BaseException:  # the model is ready but not returned: its buffers go back (after the tee's copy)
            loaded.release()
            raise
        phases["tokenizer"] = time.perf_counter() - tokenizer_started
    log.info("loaded %s from %s (%s, %s) in %.3f s, %.2f GB/s", ckpt.root, tier_name, stats.reader_mode,
             ",".join(stats.devices), seconds, stats.gbps)
    return loaded


# ------------------------------------------------------------------------------------------------ devices


def _normalize_device(value: Any) -> str:
    import torch

    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise DeviceSpecError(f"device {value!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or a GPU index") \
            from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else 0}"
    raise DeviceSpecError(f"device {value!r} is not supported by the loader (only cpu and cuda)")


def resolve_devices(device: Any, ckpt: Checkpoint) -> tuple[Callable[[str], str], set[str]]:
    """(tensor or module name -> device string, the set of devices) for a device or device_map."""
    if device == "auto":
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, dict):
        single = _normalize_device(device)
        return (lambda name: single), {single}
    device_map = {str(prefix): _normalize_device(value) for prefix, value in device.items()}

    def device_of(name: str) -> str:
        best = None
        for prefix in device_map:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best):
                    best = prefix
        if best is None:
            raise DeviceSpecError(f"device_map does not place {name!r}; add its module (or '' for the rest)")
        return device_map[best]

    devices = {device_of(name) for name in ckpt.tensors}
    return device_of, devices or {"cpu"}


# --------------------------------------------------------------------------------------------- the load itself


class _Load:
    """The data movement of one load: mode choice, destination memory, pipeline, cleanup on failure."""

    def __init__(self, ckpt: Checkpoint, settings: TierSettings, verify: bool, device_of, devices: set[str],
                 pool: HostBufferPool, staged: bool, tee: LoadTee | None = None, plan: ReadPlan | None = None,
                 shared_memory: bool = False):
        self.ckpt = ckpt
        self.plan = plan or ReadPlan(settings.reader, settings.threads, settings.unit_bytes, "default")
        self.tee = tee
        self.settings = settings
        self.verify = verify
        self.device_of = device_of
        self.devices = devices
        self.pool = pool
        self.shared_memory = shared_memory
        self.host_buffers: list[HostBuffer] = []
        self.pool_reused_bytes = 0
        self.pipeline: Pipeline | None = None
        self.readers: dict[int, FileReader] = {}
        self.ring: StagingRing | None = None
        self.placement: Placement | None = None
        self.bases: dict[tuple[int, str], Any] = {}
        self.read_seconds = 0.0
        self.fallback_reason = None
        host_only = devices == {"cpu"}
        self.staged = not host_only or staged
        # Mapping a file instead of reading it is no saving for weights bound for shared memory: torch would copy a
        # mapping's pages into a new segment when the model is pickled. Those loads read every tier (DRAM: a
        # buffered copy out of tmpfs; a mapped plan: buffered reads) into shared buffers.
        mappable = not self.staged and not shared_memory
        in_memory = mappable and (settings.reader == MMAP or self._page_cache_holds_it())
        # A mapped plan (the probe measured no O_DIRECT on this filesystem): map the cold files and fault them in
        # from the disk in `plan.threads` threads during the load (the page cache's pages become the weights).
        self.populate_now = mappable and not in_memory and self.plan.mode == MMAP
        self.zero_copy = not self.staged and (in_memory or self.populate_now)
        self.reader_mode = MMAP if self.zero_copy else (BUFFERED if self.plan.mode == MMAP else self.plan.mode)
        self.threads = self.plan.threads
        self.request_bytes = 0 if self.zero_copy and not self.populate_now else self.plan.block_bytes
        self.populate_thread: threading.Thread | None = None
        self.verifier: ThreadPoolExecutor | None = None
        self.verifications: list = []
        self.started_at = 0.0

    def _page_cache_holds_it(self) -> bool:
        """Disk tier, CPU target, data already in the page cache: map it instead of copying it out."""
        if not self.settings.map_cached:
            return False
        cached = min((cached_fraction(p.path) for p in self.ckpt.partitions if p.size), default=0.0)
        if cached < CACHED_ENOUGH:
            return False
        self.fallback_reason = f"the page cache holds {cached:.0%} of the data files: mapped, not read"
        return True

    def _partitions_with_data(self) -> list[int]:
        return [p.index for p in self.ckpt.partitions if p.size > 0]

    def start(self) -> None:
        self.started_at = time.perf_counter()
        parts = self._partitions_with_data()
        if self.zero_copy:
            self._map_shared(parts)
            return
        for p in parts:
            part = self.ckpt.partitions[p]
            self.readers[p] = FileReader(part.path, self.reader_mode, expected_size=part.size)
        units = plan_units(self.ckpt, parts, self.plan.block_bytes)
        if self.staged:
            target = self._staged_target(units)
        else:
            self.placement = whole_partition_placement(self.ckpt, "cpu")
            buffers = {p: self._host_buffer(self.ckpt.partitions[p].size) for p in parts}
            self.bases = {(p, "cpu"): buffers[p] for p in parts}
            target = DirectHostTarget(buffers)
        # A staged load's bytes pass through reused slots: the tee takes them there. A direct one writes later.
        self.pipeline = Pipeline(self.ckpt, units, self.readers, target, verify=self.verify,
                                 threads=self.plan.threads, prefault=self.settings.prefault,
                                 tee=self.tee if self.staged else None, request_bytes=self.plan.block_bytes).start()

    def _map_shared(self, parts: list[int]) -> None:
        """Tensors will be views of private (copy-on-write) mappings of the files: no read, no copy."""
        self.placement = whole_partition_placement(self.ckpt, "cpu")
        for p in parts:
            self.bases[(p, "cpu")] = MappedFile(self.ckpt.partitions[p].path, shared=False)
        if self.populate_now:  # cold files: read them into the page cache and map them, in the probe's threads
            units = plan_units(self.ckpt, parts, self.plan.block_bytes)
            self.verifier = ThreadPoolExecutor(max_workers=self.plan.threads, thread_name_prefix="hpcllm-populate")
            self.verifications = [self.verifier.submit(self._populate_unit, u) for u in units]
        elif self.verify:  # hashing reads every page, which also maps it in; runs while the skeleton is built
            chunks = [(p, c) for p in parts for c in range(self.ckpt.partitions[p].num_chunks)]
            self.verifier = ThreadPoolExecutor(max_workers=self.settings.threads, thread_name_prefix="hpcllm-verify")
            self.verifications = [self.verifier.submit(self._verify_mapped, p, c) for p, c in chunks]

    def finish_tee(self) -> threading.Thread | None:
        """Complete the cache-on-load copy. A staged load's tee got every unit from the pipeline. A CPU load's host
        buffers (or page-cache / shm mappings) mirror the files and stay as the model's weights: a thread writes
        them out after the model is ready, so the load does not wait for the write (returns that thread)."""
        if self.staged:
            self._complete_tee()
            return None
        sources = [(p, base) for (p, _), base in self.bases.items()]
        thread = threading.Thread(target=self._write_tee, args=(sources,), name="hpcllm-tee", daemon=True)
        thread.start()
        return thread

    def _write_tee(self, sources) -> None:
        for p, base in sources:
            self.tee.write(p, 0, base.view()[:self.ckpt.partitions[p].size])
        self._complete_tee()

    def _complete_tee(self) -> None:
        if not self.tee.finish():
            log.warning("no cache-on-load copy of %s: %s", self.ckpt.root, self.tee.error)

    def populate_in_background(self) -> None:
        """Unverified mapping: map its pages in behind the caller's back (once the model is ready), so the first
        forward pass does not take a page fault per 4 KiB."""
        if self.zero_copy and not self.verify and not self.populate_now:
            mappings = [base for base in self.bases.values() if isinstance(base, MappedFile)]
            self.populate_thread = threading.Thread(target=_populate_read, args=(mappings,), daemon=True,
                                                    name="hpcllm-populate")
            self.populate_thread.start()

    def _populate_unit(self, unit) -> None:
        """Fault a unit's pages of the mapping in (the kernel reads them from the disk), in requests of the plan's
        block size, then check its chunks when this load verifies."""
        base = self.bases[(unit.partition, "cpu")]
        end = unit.offset + unit.nbytes
        for start in range(unit.offset, end, self.plan.block_bytes):
            length = min(self.plan.block_bytes, end - start)
            populate_read(base.address + start, length)  # the disk read (kernels before 5.14: the touch below)
            # Reading one byte per page from this thread, while others wait for the disk: on these VMs the first
            # access to freshly read pages costs the hypervisor's mapping of them (seen as up to ~1 s for 2 GB
            # when left to the model's first use, with no page fault in the guest).
            _touch_pages(base, start, length)
        if self.verify:
            for chunk in range(unit.first_chunk, unit.last_chunk + 1):
                self._verify_mapped(unit.partition, chunk)

    def _verify_mapped(self, partition: int, chunk: int) -> None:
        start, length = self.ckpt.partitions[partition].chunk_range(chunk)
        self.ckpt.verify_chunk(partition, chunk, self.bases[(partition, "cpu")].view()[start:start + length])

    def _host_buffer(self, nbytes: int) -> HostBuffer:
        buffer = self.pool.acquire(nbytes, shared=self.shared_memory)
        if buffer.populated:
            self.pool_reused_bytes += buffer.capacity
        self.host_buffers.append(buffer)
        return buffer

    def _staged_target(self, units) -> StagedTarget:
        self.placement = packed_placement(self.ckpt, self.device_of)
        gpus = sorted(d for d in self.devices if d != "cpu")
        engines: dict[str, Any] = {"cpu": HostCopyEngine()}
        if gpus:
            import torch

            from hpcllm.store.cuda import CudaCopyEngine, device_buffer, require_cuda

            for gpu in gpus:
                require_cuda(torch.device(gpu))
        slot_bytes = max(round_up(u.nbytes, ALIGNMENT) for u in units) if units else ALIGNMENT
        for (p, device), nbytes in self.placement.dest_bytes.items():
            if device == "cpu":
                self.bases[(p, device)] = self._host_buffer(nbytes)
            else:
                self.bases[(p, device)] = device_buffer(max(nbytes, 1), torch.device(device))
        dests = {key: (base if not isinstance(base, HostBuffer) else base.tensor())
                 for key, base in self.bases.items()}
        if gpus:
            from hpcllm.store.cuda import pinned_slot

            # after the device buffers exist, on the caller's thread: the copy streams wait for their allocation
            engines.update({gpu: CudaCopyEngine(torch.device(gpu)) for gpu in gpus})
            make_slot = pinned_slot
        else:
            make_slot = host_slot
        # One slot now, the rest while the readers use it (StagingRing.grow).
        self.ring = StagingRing([make_slot(0, slot_bytes)], DeviceRouter(engines))
        self.ring.grow(lambda index: make_slot(index, slot_bytes), self.settings.staging_slots)
        return StagedTarget(self.ring, self.placement, dests)

    def finish(self) -> dict[tuple[int, str], Any]:
        if self.pipeline is not None:
            stats = self.pipeline.finish()
            self.read_seconds = stats.read_seconds
        if self.ring is not None and self.ring.grow_error is not None:
            log.warning("loaded %s through %d of %d staging slots: allocating the others failed (%s)", self.ckpt.root,
                        self.ring.stats.slots, self.settings.staging_slots, self.ring.grow_error)
        if self.verifier is not None:
            try:
                for verification in self.verifications:
                    verification.result()  # re-raises the first ChecksumMismatch (or read error)
            finally:
                self._stop_verifier()
            self.read_seconds = time.perf_counter() - self.started_at
        self._close_readers()
        return self.bases

    def _stop_verifier(self) -> None:
        if self.verifier is not None:
            for verification in self.verifications:
                verification.cancel()
            self.verifier.shutdown(wait=True)
            self.verifier = None

    def _close_readers(self) -> None:
        reasons = [r.fallback_reason for r in self.readers.values() if r.fallback_reason]
        if reasons:
            self.fallback_reason = reasons[0]
            self.reader_mode = BUFFERED
        for reader in self.readers.values():
            reader.close()
        self.readers = {}

    def abort(self) -> None:
        if self.pipeline is not None:
            self.pipeline.abort()
        self._stop_verifier()
        self._close_readers()
        self.release_buffers()

    def release_buffers(self) -> None:
        for buffer in self.host_buffers:
            self.pool.release(buffer)
        self.host_buffers = []
        self.bases = {}

    def mappings(self) -> list:
        return [base for base in self.bases.values() if isinstance(base, MappedFile)]

    def device_buffers(self) -> list:
        return [base for (_, device), base in self.bases.items() if device != "cpu"]

    def staging_stats(self) -> dict[str, int] | None:
        return None if self.ring is None else asdict(self.ring.stats)

    def pipeline_stats(self) -> dict[str, float] | None:
        return None if self.pipeline is None else self.pipeline.stats.as_dict()


def _tensor_views(ckpt: Checkpoint, placement: Placement, bases, stored_dtypes, target_dtypes, device_of):
    """Every stored tensor as a view of its load buffer (converted only if its model tensor has another dtype:
    `target_dtypes(name)`, see skeleton.loaded_dtypes).

    One as_strided per tensor on a typed view of its buffer (offsets are 4096-aligned, so every dtype divides
    them) instead of slice + view(dtype) + view(shape): ~3x fewer torch calls for a few hundred tensors.
    """
    import torch

    uint8_bases = {key: (base.tensor() if isinstance(base, (HostBuffer, MappedFile)) else base)
                   for key, base in bases.items()}
    typed_bases: dict[tuple, Any] = {}
    tensors = {}
    for name, entry in ckpt.tensors.items():
        dtype = stored_dtypes[name]
        if entry.nbytes == 0:
            tensor = torch.empty(entry.shape, dtype=dtype, device=device_of(name))
        else:
            device, offset = placement.locate(entry)
            if offset % entry.itemsize:  # never with the 4096-aligned placements; kept correct regardless
                raw = uint8_bases[(entry.partition, device)][offset:offset + entry.nbytes]
                tensors[name] = _converted(raw.view(dtype).view(entry.shape), entry, dtype, target_dtypes(name))
                continue
            key = (entry.partition, device, dtype)
            typed = typed_bases.get(key)
            if typed is None:
                raw = uint8_bases[(entry.partition, device)]
                typed = typed_bases[key] = raw[:raw.numel() // entry.itemsize * entry.itemsize].view(dtype)
            # as_strided's offset counts from the storage's start: a carved shared buffer's view starts inside it
            tensor = typed.as_strided(entry.shape, entry.stride, typed.storage_offset() + offset // entry.itemsize)
        tensors[name] = _converted(tensor, entry, dtype, target_dtypes(name))
    return tensors


def _converted(tensor, entry, dtype, target_dtype):
    if target_dtype is not None and entry.dtype in FLOATING_DTYPES and dtype != target_dtype:
        return tensor.to(target_dtype)
    return tensor


def _attach(model, tensors, ckpt: Checkpoint, device_of, devices: set[str]) -> None:
    from hpcllm.store.skeleton import attach, move_buffers

    attach(model, tensors, ckpt.aliases, ckpt.root / INDEX_FILE)
    if devices != {"cpu"}:
        move_buffers(model, device_of)
        if len(devices) > 1:
            from hpcllm.store.dispatch import align_devices

            align_devices(model)
    generation_config = ckpt.root / "generation_config.json"
    if generation_config.is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(ckpt.root)
    model.name_or_path = str(ckpt.root)
    model.config._name_or_path = str(ckpt.root)


# ------------------------------------------------------------------------------------------------- side files


def _load_config(root: Path):
    from transformers import AutoConfig

    from hpcllm.checkpoint import MissingFile

    if not (root / "config.json").is_file():
        raise MissingFile(f"{root / 'config.json'}: the checkpoint has no model config; re-convert it")
    return AutoConfig.from_pretrained(root)


def model_dtype(dtype, config, ckpt: Checkpoint):
    """Like from_pretrained(dtype="auto"): an explicit dtype, else config.json's, else the stored floating one. The
    one rule for every loader (the tensor-parallel one too), so a model's dtype does not depend on its degree."""
    import torch

    if dtype not in (None, "auto"):
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return getattr(torch, configured) if isinstance(configured, str) else configured
    floating = Counter(e.dtype for e in ckpt.tensors.values() if e.dtype in FLOATING_DTYPES)
    return ckpt.torch_dtype(floating.most_common(1)[0][0]) if floating else torch.get_default_dtype()


def _load_tokenizer(root: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((root / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root)


POPULATE_STEP = 16 << 20


def _populate_read(mappings) -> None:
    # Small steps: madvise holds the process's mmap lock, which every allocation that maps memory needs too.
    for mapping in mappings:
        for start in range(0, mapping.capacity, POPULATE_STEP):
            if not populate_read(mapping.address + start, min(POPULATE_STEP, mapping.capacity - start)):
                return


def _touch_pages(mapping, start: int, length: int) -> None:
    import numpy as np

    np.frombuffer(mapping.mmap, dtype=np.uint8)[start:start + length:mmap.PAGESIZE].sum()


def _read_plan(read_tuning, tier: str, settings: TierSettings, host_target: bool, root: Path,
               threads: int | None, unit_bytes: int | None, prefaulted: bool) -> ReadPlan:
    """How this load reads: explicit threads / unit_bytes win, then the node probe's tuning, then tier defaults.
    `prefaulted`: the pool holds faulted-in memory for every partition (a worker's reserved arena)."""
    if settings.reader == MMAP:  # copied only by a staged or shared-memory load: as many threads as memcpy scales to
        copiers = settings.threads if threads is not None else memory_copy_threads()
        return ReadPlan(MMAP, copiers, settings.unit_bytes, f"tier {tier}: the files are in memory")
    if threads is not None or unit_bytes is not None:
        return ReadPlan(settings.reader, settings.threads, settings.unit_bytes, "arguments: threads / unit_bytes")
    tuning, where = load_tuning(read_tuning)
    try:
        device = os.stat(root).st_dev
    except OSError:
        device = None
    return choose_read_plan(tuning, tier, settings.reader, settings.threads, settings.unit_bytes, host_target,
                            device, where, prefaulted=prefaulted)


def _verify_side_files(ckpt: Checkpoint) -> None:
    """config.json, tokenizer files...: small, but they define the model as much as the weights do."""
    from hpcllm.checkpoint import ChecksumMismatch
    from hpcllm.checkpoint.layout import read_file_checksum

    for side in ckpt.side_files:
        path = ckpt.root / side.file
        if read_file_checksum(path) != side.checksum:  # an unreadable or missing file: a clear MissingFile
            raise ChecksumMismatch(f"{path}: xxh3_64 differs from the manifest; the file was modified or is "
                                   f"corrupt, re-copy or re-convert the checkpoint")


def _filled_by_dram_tier(root: Path) -> bool:
    """A DRAM-tier copy that DramTier filled (and verified) and that is still ours and unchanged: no checksum pass.
    A marker on a copy that is not (planted by another user, or a file altered since) means: verify everything."""
    from hpcllm.store.dram import MARKER_FILE, copy_intact

    if copy_intact(root):
        return True
    if (root / MARKER_FILE).is_file():
        log.warning("%s carries the DRAM tier's marker but is not the copy it verified (owner, permissions or "
                    "files changed): verifying every chunk", root)
    return False
