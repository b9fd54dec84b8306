"""MPI-coordinated loading of a tensor-parallel shard: every rank of a communicator loads its part of one model.

Protocol (the same collective calls in the same order on every rank, so no rank can wait for a call another rank
never makes):

1. rank 0 reads manifest.json, index.json, slice-hashes.json and config.json and broadcasts them (a few hundred
   KB of picklable plan: shapes, offsets, hashes); or its error, which every rank raises as "rank 0: ...".
2. every rank computes its own slice plan from that (same code, same inputs: the ranks agree) and reads + verifies
   its slices. Replicated tensors below `bcast_max_bytes` in total (norms, biases) are read by rank 0 only and
   broadcast: one read instead of N, and on a shared filesystem one client instead of N. Larger replicated
   tensors (an unsplit embedding) are read by every rank, in parallel.
3. status exchange: every rank sends its status code to every other (non-blocking), polled against `timeout_s`. A failed
   rank (corrupt slice, missing file, out of memory, ...) makes every rank raise TensorParallelLoadError naming
   each failed rank and its cause; a rank that does not report within the timeout (a hung read) makes the others
   abort the job (MPI_Abort) naming the silent ranks, so nothing waits forever.
4. rank 0 broadcasts the replicated tensors it read; every rank builds its model shard.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.tp.plan import DEFAULT_BCAST_MAX_BYTES, rank_slices

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
_OK, _FAILED = 0, 1
_STATUS_TAG = 7117


class TensorParallelLoadError(HpcllmError):
    """A rank could not load its shard; raised on every rank, naming the rank(s) and the cause. Its exit status is
    a failed rank's CheckpointError's where there is one (ChecksumMismatch's first): the node agent then replaces
    the cached copy a rank read bad bytes from (its slice copy, the node's whole copy), as for a single worker."""

    def __init__(self, message: str, exit_code: int = HpcllmError.exit_code):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class _Failure:
    """A rank's failure as it travels to every rank: its message and the exit status it stands for."""

    message: str
    exit_code: int = HpcllmError.exit_code


@dataclass
class ShardLoad:
    model: Any
    tokenizer: Any
    rank: int
    size: int
    stats: dict = field(default_factory=dict)  # this rank's: bytes_read, reads, seconds, ...
    all_stats: list[dict] | None = None  # rank 0: every rank's stats


@dataclass(frozen=True)
class _Plan:
    root: str
    config: dict
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    dtype: str
    total_bytes: int
    manifest_xxh3: str = ""  # identifies the checkpoint version: a rank's slice copy must match it


def load_shard(path: str | Path, comm: Any = None, *, tier: str | None = None, verify: bool = True,
               timeout_s: float = DEFAULT_TIMEOUT_S, bcast_max_bytes: int = DEFAULT_BCAST_MAX_BYTES,
               gap_bytes: int | None = None, tokenizer: bool = True, device: str = "cpu",
               collective: Any = None, slice_copy: str | Path | None = None, node: str | None = None) -> ShardLoad:
    """Load this rank's shard of the converted checkpoint at `path` (every rank of `comm` calls this).

    `path` matters on rank 0 (the plan) and on every rank (the data files): each rank reads its slices from its own
    view of the folder (a node-local cache or the shared filesystem). `collective` defaults to mpi4py on CPU.
    `slice_copy`: this rank's node's copy of its slices (hpcllm.tp.slicecache), used when it was made for this degree,
    rank and checkpoint version; what it does not hold is read from `path`. `node`: this rank's node as Slurm names
    it, in its stats (default: the host name; fake Slurm nodes share one host).
    """
    from hpcllm.mpi import comm_world

    comm = comm if comm is not None else comm_world()
    rank, size = comm.Get_rank(), comm.Get_size()
    # torch and transformers' configuration code: ~3.6 of a small model's 3.7 s load here (on the H200 machine,
    # ~6 s) when a freshly launched rank imports them in its load. Timed apart, as a worker's own start is.
    imports_began = time.perf_counter()
    import torch  # noqa: F401
    import transformers.models.auto.configuration_auto  # noqa: F401
    started = time.perf_counter()

    plan_or_error = _read_plan(path, size) if rank == 0 else None
    plan_or_error = comm.bcast(plan_or_error, root=0)
    # A follower's load begins with the plan: until the lead (which starts its HTTP server first) read it, the
    # follower only waited, and its load time (the lead's log, /ready's rank_loads) would count the lead's start.
    load_began = started if rank == 0 else time.perf_counter()
    if isinstance(plan_or_error, _Failure):
        raise TensorParallelLoadError(f"rank 0 on {socket.gethostname()}: {plan_or_error.message}" if rank == 0
                                      else f"rank 0: {plan_or_error.message}", plan_or_error.exit_code)
    plan: _Plan = plan_or_error

    outcome: dict[str, Any] = {}
    error = _guarded(lambda: outcome.update(_read_own_slices(plan, Path(path), rank, size, tier, verify,
                                                              bcast_max_bytes, gap_bytes, slice_copy)))
    _exchange_status(comm, error, timeout_s)

    tensors = outcome["tensors"]
    _broadcast_replicated(comm, outcome["bcast_slices"], tensors, outcome["bcast_dtypes"])
    stats = {**outcome["stats"], "rank": rank, "host": socket.gethostname(), "node": node or socket.gethostname(),
             "path": str(path)}

    # The model's assembly from the slices and its move to the rank's device, timed apart from the reads.
    build_began = time.perf_counter()
    error = _guarded(lambda: outcome.update(model=_build(plan, tensors, Path(path), size, comm, collective, device)))
    stats["build_seconds"] = round(time.perf_counter() - build_began, 4)
    if error is None and tokenizer and rank == 0:  # only the lead tokenizes; its failure must reach every rank
        error = _guarded(lambda: outcome.update(tokenizer=_tokenizer(Path(path))))
    _exchange_status(comm, error, timeout_s)
    tok = outcome.get("tokenizer")
    stats["seconds"] = round(time.perf_counter() - load_began, 4)
    stats["import_seconds"] = round(started - imports_began, 4)
    all_stats = comm.gather(stats, root=0)
    return ShardLoad(outcome["model"], tok, rank, size, stats, all_stats if rank == 0 else None)


def _read_plan(path: str | Path, degree: int) -> _Plan | _Failure:
    """Rank 0: the broadcastable plan, or its failure (never raises: the failure must reach every rank)."""
    try:
        import json

        from hpcllm.checkpoint import read_checkpoint
        from hpcllm.store.loader import model_dtype
        from hpcllm.tp.plan import check_degree
        from hpcllm.tp.slicecache import manifest_fingerprint

        ckpt = read_checkpoint(path)
        config = json.loads(ckpt.config_path.read_text())
        plan = _Plan(str(ckpt.root), config, {n: tuple(e.shape) for n, e in ckpt.tensors.items()},
                     dict(ckpt.aliases), "", ckpt.total_bytes, manifest_fingerprint(ckpt.root))
        model_config = _config_of(plan)
        check_degree(model_config, degree)  # whole heads per rank: a divisible tensor is not enough
        # The single-rank loader's rule (config.json's dtype first, as from_pretrained), not the manifest's dtype.
        dtype = str(model_dtype(None, model_config, ckpt)).removeprefix("torch.")
        return replace(plan, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - travels to every rank as text
        return _failure(exc)


def estimate_rank_reads(root: str | Path, degree: int, gap_bytes: int | None = None) -> list[tuple[int, int]]:
    """(bytes, read requests) each rank of a degree-`degree` load would read, planned without reading: what a
    start-up estimate needs per rank (the slowest rank's bytes over its node's bandwidth)."""
    from hpcllm.checkpoint import read_checkpoint
    from hpcllm.checkpoint.slicehashes import read_slice_hashes
    from hpcllm.tp.plan import check_degree, model_config
    from hpcllm.tp.reader import COALESCE_GAP_BYTES, planned_reads

    ckpt = read_checkpoint(root)
    config = model_config(ckpt.root, degree)
    check_degree(config, degree)
    hashes = read_slice_hashes(ckpt)
    gap = COALESCE_GAP_BYTES if gap_bytes is None else gap_bytes
    return [planned_reads(ckpt, rank_slices(ckpt, config, degree, rank)[0], hashes, verify=hashes is not None,
                          gap_bytes=gap) for rank in range(degree)]


@dataclass(frozen=True)
class RankReadPlan:
    """What one rank reads, planned without reading: from the checkpoint's files (dim-0 slices, dim-1 slices and
    replicated tensors apart: each kind planned on its own) and from a slice copy of its own (hpcllm.tp.slicecache)."""

    rank: int
    total: tuple[int, int]  # (bytes, reads) of the whole load from the checkpoint
    dim0: tuple[int, int]
    dim1: tuple[int, int]
    replicated: tuple[int, int]
    dim1_share_bytes: int  # the bytes of its dim-1 slices themselves
    slice_copy: tuple[int, int]  # (bytes, reads) of the same load from its slice copy


def rank_read_plans(root: str | Path, degree: int, gap_bytes: int | None = None) -> list[RankReadPlan]:
    """Per rank: bytes and read requests by kind of slice, from the checkpoint and from a slice copy."""
    import math

    from hpcllm.checkpoint import read_checkpoint
    from hpcllm.checkpoint.layout import ALIGNMENT, DTYPE_ITEMSIZE
    from hpcllm.checkpoint.slicehashes import read_slice_hashes
    from hpcllm.tp.plan import check_degree, model_config
    from hpcllm.tp.reader import COALESCE_GAP_BYTES, _cover, planned_reads

    ckpt = read_checkpoint(root)
    config = model_config(ckpt.root, degree)
    check_degree(config, degree)
    hashes = read_slice_hashes(ckpt)
    gap = COALESCE_GAP_BYTES if gap_bytes is None else gap_bytes
    plans = []
    for rank in range(degree):
        own = rank_slices(ckpt, config, degree, rank)[0]

        def planned(slices):
            return planned_reads(ckpt, slices, hashes, verify=hashes is not None, gap_bytes=gap) if slices else (0, 0)

        dim1 = [s for s in own if s.dim == 1]
        covered, _ = _cover(ckpt, own, hashes, hashes is not None)
        copy_bytes = sum(-(-math.prod(c.shape3d) // ALIGNMENT) * ALIGNMENT for c in covered)
        plans.append(RankReadPlan(
            rank, planned(own), planned([s for s in own if s.dim == 0]), planned(dim1),
            planned([s for s in own if s.dim is None]),
            sum(math.prod(s.local_shape) * DTYPE_ITEMSIZE[ckpt.tensors[s.stored].dtype] for s in dim1),
            (copy_bytes, len(covered))))
    return plans


def _read_own_slices(plan: _Plan, path: Path, rank: int, size: int, tier: str | None, verify: bool,
                     bcast_max_bytes: int, gap_bytes: int | None, slice_copy: str | Path | None) -> dict:
    from hpcllm.checkpoint import read_checkpoint
    from hpcllm.checkpoint.slicehashes import read_slice_hashes
    from hpcllm.tp.reader import COALESCE_GAP_BYTES, read_slices
    from hpcllm.tp.slicecache import usable_slice_copy

    ckpt = read_checkpoint(path)  # this rank's view of the folder: its own data files, same index
    own, bcast = rank_slices(ckpt, _config_of(plan), size, rank, bcast_max_bytes)
    local = usable_slice_copy(slice_copy, size, rank, plan.manifest_xxh3)
    tensors, stats = read_slices(ckpt, own, read_slice_hashes(ckpt), tier=tier, verify=verify,
                                 gap_bytes=COALESCE_GAP_BYTES if gap_bytes is None else gap_bytes, local=local)
    stats = {**stats.as_dict(), "slice_copy": str(local.root) if local is not None else None}
    return {"tensors": tensors, "stats": stats, "bcast_slices": bcast,
            "bcast_dtypes": {s.name: ckpt.tensors[s.stored].dtype for s in bcast}}


def _config_of(plan: _Plan):
    from transformers import AutoConfig

    config_dict = dict(plan.config)
    model_type = config_dict.pop("model_type")
    return AutoConfig.for_model(model_type, **config_dict)


def _build(plan: _Plan, tensors: dict, root: Path, size: int, comm: Any, collective: Any, device: str):
    import torch

    from hpcllm.checkpoint.layout import INDEX_FILE, torch_dtype
    from hpcllm.tp.model import MpiCollective, SingleRank, build_shard_model
    from hpcllm.tp.plan import module_plan

    config = _config_of(plan)
    collective = collective or (MpiCollective(comm) if size > 1 else SingleRank())
    plan_rules = module_plan(config) if size > 1 else None
    with torch.no_grad():
        return build_shard_model(config, tensors, plan_rules, collective, torch_dtype(plan.dtype), root / INDEX_FILE,
                                 device=device)


def _tokenizer(root: Path):
    from hpcllm.store.loader import _load_tokenizer  # the loader's own rules (None without tokenizer files)

    try:
        return _load_tokenizer(root)
    except Exception as exc:  # noqa: BLE001 - transformers raises anything from a broken file
        raise HpcllmError(f"cannot load the tokenizer files of {root}: {_describe(exc)}") from None


def _broadcast_replicated(comm: Any, slices: list, tensors: dict, dtypes: dict[str, str]) -> None:
    """Rank 0 sends the small replicated tensors it read in one packed buffer; the others unpack views of it."""
    if not slices:
        return
    import math

    import torch

    from hpcllm.checkpoint.layout import DTYPE_ITEMSIZE, torch_dtype

    sizes = [math.prod(s.full_shape) * DTYPE_ITEMSIZE[dtypes[s.name]] for s in slices]
    packed = np.empty(sum(sizes), dtype=np.uint8)
    if comm.Get_rank() == 0:
        at = 0
        for s, n in zip(slices, sizes):
            packed[at:at + n] = tensors[s.name].contiguous().view(-1).view(torch.uint8).numpy()
            at += n
    comm.Bcast(packed, root=0)
    if comm.Get_rank() != 0:
        at = 0
        for s, n in zip(slices, sizes):
            raw = torch.from_numpy(packed[at:at + n])
            tensors[s.name] = raw.view(torch_dtype(dtypes[s.name])).reshape(s.full_shape)
            at += n


def _guarded(action) -> _Failure | None:
    """Run action; its failure (MemoryError and every other error: they must reach the others)."""
    try:
        action()
        return None
    except MemoryError as exc:
        return _Failure(f"out of memory ({exc or 'MemoryError'})")
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            return _Failure(f"out of memory ({exc.strerror})")
        return _failure(exc)
    except Exception as exc:  # noqa: BLE001
        return _failure(exc)


def _failure(exc: BaseException) -> _Failure:
    """exc as it travels: a CheckpointError keeps its exit status (bad bytes or files of a copy: BAD_COPY_EXITS)."""
    from hpcllm.checkpoint.errors import CheckpointError

    return _Failure(_describe(exc), exc.exit_code if isinstance(exc, CheckpointError) else HpcllmError.exit_code)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HpcllmError) else f"{type(exc).__name__}: {exc}"


def _exchange_status(comm: Any, error: _Failure | None, timeout_s: float) -> None:
    """Every rank learns every rank's status; raises TensorParallelLoadError on all ranks if any failed.

    Point-to-point, non-blocking (N*(N-1) messages of 8 bytes): unlike a collective it tells exactly which ranks
    never reported when the timeout passes; those are named and the job is aborted (MPI_Abort), since a rank stuck
    in a read cannot be interrupted from here.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = np.array([_FAILED if error else _OK], dtype=np.int64)
    sends = [comm.Isend(mine, dest=other, tag=_STATUS_TAG) for other in range(size) if other != rank]
    received = {other: np.full(1, -1, dtype=np.int64) for other in range(size) if other != rank}
    pending = {other: comm.Irecv(buffer, source=other, tag=_STATUS_TAG) for other, buffer in received.items()}
    deadline = time.monotonic() + timeout_s
    pause = 0.0
    while pending:
        pending = {other: request for other, request in pending.items() if not request.Test()}
        if pending and time.monotonic() > deadline:
            message = (f"rank {rank}: rank(s) {', '.join(map(str, sorted(pending)))} did not report within "
                       f"{timeout_s:g} s while loading the model shard; aborting every rank")
            log.error(message)
            print(f"error: {message}", flush=True)
            comm.Abort(3)
        time.sleep(pause)
        pause = min(0.005, pause + 0.0002)  # waiting ranks should not spin a core other ranks read with
    for request in sends:
        request.Wait()
    if not error and not any(int(buffer[0]) for buffer in received.values()):
        return
    failures = comm.allgather(_Failure(f"{error.message} (on {socket.gethostname()})", error.exit_code)
                              if error else None)
    failed = "; ".join(f"rank {r}: {f.message}" for r, f in enumerate(failures) if f)
    # The highest status: a checksum mismatch (4) says more of a copy than another CheckpointError (3), either more
    # than a failure of no copy's (1).
    raise TensorParallelLoadError(f"loading the {size}-rank shards failed: {failed}",
                                  max(f.exit_code for f in failures if f))


__all__ = ["ShardLoad", "TensorParallelLoadError", "load_shard"]
