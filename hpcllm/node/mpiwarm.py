"""Warm many nodes' NVMe caches reading the shared filesystem once: an MPI job, one rank per node.

    srun --mpi=pmix -N4 --ntasks-per-node=1 python -m hpcllm.node.mpiwarm --source /shared/models/llama \
        --model llama --tier nvme --nvme-dir-template '/var/tmp/hpcllm/nvme/{node}'

Rank 0 validates the origin and reads every data file once; hpcllm.mpi.bcast_file_chunks broadcasts it chunk by
chunk (two buffers in flight, so reading, the network and the writes overlap), one broadcast chunk = one manifest
chunk. Every rank writes into a temporary folder of its node's cache (`.<model>.filling-<pid>-<rnd>`), checks each
chunk against the manifest as it arrives, then re-reads its written copy and verifies every checksum. Only when
ALL ranks verified (an allreduce of success flags) does each rank write the cache marker and rename its folder into
place; otherwise every rank deletes its temporary folder and the job exits 1 naming each failed rank, node and
reason. No rank ever waits forever: every rank takes part in every collective, whatever failed locally.

`{node}` (or `%n`, as in [node] nvme_dir) in the template is $SLURMD_NODENAME (the host name outside Slurm),
`{rank}` the MPI rank, and $VARIABLES are expanded (one not set on a node fails that rank): on the dev
cluster the four fake nodes share one host, so their cache folders must differ.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hpcllm.checkpoint import CheckpointError, read_checkpoint
from hpcllm.checkpoint.layout import MANIFEST_FILE
from hpcllm.errors import HpcllmError
from hpcllm.node.cache import (NVME, CacheError, CacheManager, check_model_name, checkpoint_bytes, content_id,
                               filling_name, folder_bytes, fsync_dir, manifest_digest, open_origin, write_marker)
from hpcllm.node.identity import expand_variables

RESULT_PREFIX = "mpiwarm:"


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


JOB_SCOPED_MESSAGE = ("the NVMe folder {template!r} is job-scoped (%j): a separate MPI warm job cannot fill another "
                      "job's scratch; warm it through the running agents instead (hpcllm cache warm without --mpi)")


def nvme_dir_for(template: str, node: str, rank: int) -> Path:
    if "%j" in template:
        raise CacheError(JOB_SCOPED_MESSAGE.format(template=template))
    template = template.replace("%n", node)  # the node agent's nvme_dir pattern ([node] nvme_dir) works as is
    try:
        folder = template.format(node=node, rank=rank)
    except (KeyError, IndexError, ValueError) as exc:
        raise CacheError(f"--nvme-dir-template {template!r}: only {{node}} and {{rank}} may be used ({exc})") from None
    return Path(expand_variables(folder, "--nvme-dir-template", node))  # ConfigError for an unset $VARIABLE


class RankFill:
    """One rank's side of the warm: a temporary folder it writes, verifies, and commits or removes."""

    def __init__(self, model: str, nvme_dir: Path, capacity_bytes: int):
        self.model = model
        self.nvme_dir = nvme_dir
        self.capacity_bytes = capacity_bytes
        self.error = ""
        self.tmp: Path | None = None
        self.cache: CacheManager | None = None
        self.fill_id: str | None = None
        self.already_cached = False

    def fail(self, message: str) -> None:
        if not self.error:  # keep the first cause
            self.error = message

    def prepare(self, need: int, manifest: bytes) -> None:
        """Reserve room and make the fill folder; nothing to do when the node holds a copy of this content (the
        origin's manifest). A copy of another checkpoint under the name (redeployed) is dropped first."""
        if self.error:  # no folder to prepare (nvme_dir_for failed)
            return
        try:
            self.cache = CacheManager(self.nvme_dir, self.capacity_bytes, 0, dram_namespace=None)
            existing = self.cache.get(self.model, NVME)
            if existing is not None and content_id(existing.path) == manifest_digest(manifest):
                self.already_cached = True
                return
            if existing is not None:
                self.cache.evict(self.model, NVME)  # CacheInUse while an instance still runs from it
            tmp = self.nvme_dir / filling_name(self.model)
            self.fill_id = self.cache.reserve_fill(self.model, NVME, need, tmp)
            self.tmp = tmp
            _REMOVE_ON_CANCEL.add(self.tmp)
            self.tmp.mkdir()
        except (HpcllmError, OSError) as exc:
            self.fail(f"cannot prepare {self.nvme_dir}: {_why(exc)}")

    @property
    def writing(self) -> bool:
        return not self.error and not self.already_cached and self.tmp is not None

    def write_small(self, name: str, data: bytes) -> None:
        if self.writing:
            try:
                (self.tmp / name).write_bytes(data)
            except OSError as exc:
                self.fail(f"cannot write {self.tmp / name}: {_why(exc)}")

    def verify(self) -> None:
        if self.writing:
            try:
                read_checkpoint(self.tmp).verify_files()
                fsync_dir(self.tmp)
            except CheckpointError as exc:
                self.fail(f"the written copy does not verify: {exc}")
            except OSError as exc:  # re-reading or syncing it: a disk error, not a reason to leave the collectives
                self.fail(f"the written copy cannot be checked: {_why(exc)}")

    def commit(self, source: str) -> None:
        if not self.writing:
            return
        write_marker(self.tmp, self.model, source, folder_bytes(self.tmp), time.time())
        os.rename(self.tmp, self.nvme_dir / self.model)
        _REMOVE_ON_CANCEL.discard(self.tmp)
        fsync_dir(self.nvme_dir)
        self.tmp = None

    def abandon(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _REMOVE_ON_CANCEL.discard(self.tmp)
            self.tmp = None

    def close(self) -> None:
        if self.cache is not None and self.fill_id is not None:
            try:
                self.cache.end_fill(self.fill_id)
            except HpcllmError:
                pass


def _describe_origin(model: str, source: Path) -> tuple[dict[str, Any] | None, str]:
    """On rank 0: what every rank needs to know about the origin, or an error message."""
    try:
        ckpt = open_origin(model, source)
        small = {name: (ckpt.root / name).read_bytes() for name in ckpt.metadata_files}
        small.update({side.file: (ckpt.root / side.file).read_bytes() for side in ckpt.side_files})
    except (HpcllmError, OSError) as exc:
        return None, str(exc)
    parts = [{"file": p.file, "size": p.size, "chunk_size": p.chunk_size} for p in ckpt.partitions]
    return {"small": small, "partitions": parts, "need": checkpoint_bytes(ckpt),
            "source": str(source.resolve())}, ""


def _why(exc: BaseException) -> str:
    """An OSError's reason ("No space left on device"); its whole text when it has no errno (strerror None)."""
    return getattr(exc, "strerror", None) or str(exc)


def _receive_partition(fill: RankFill, part: dict, index: int, comm, is_root: bool, source: Path,
                       manifest_ckpt, progress) -> None:
    """Every rank joins the whole broadcast of one data file; a rank that cannot write keeps consuming it."""
    from hpcllm.mpi import BroadcastError, bcast_file_chunks  # numpy + mpi4py: only where MPI runs

    def cannot_write(exc: OSError) -> None:
        fill.fail(f"cannot write {fill.tmp / part['file']}: {_why(exc)}")

    out = None
    if fill.writing:
        try:
            out = open(fill.tmp / part["file"], "wb")
        except OSError as exc:
            cannot_write(exc)
    try:
        chunks = bcast_file_chunks(source / part["file"] if is_root else None, chunk_bytes=part["chunk_size"],
                                   comm=comm)
        for chunk_index, chunk in enumerate(chunks):
            if out is not None and fill.writing:
                try:
                    manifest_ckpt.verify_chunk(index, chunk_index, chunk)
                    out.write(chunk)
                except (CheckpointError, OSError) as exc:
                    fill.fail(f"writing {part['file']} chunk {chunk_index}: {_why(exc)}")
            if progress:
                progress(len(chunk))
        if out is not None and fill.writing:
            out.flush()
            os.fsync(out.fileno())
    except BroadcastError as exc:
        fill.fail(str(exc))
    except OSError as exc:  # the flush or sync: this rank's failure, reported with the others' (it stays in the job)
        cannot_write(exc)
    finally:
        if out is not None:
            try:
                out.close()
            except OSError as exc:  # flushing what a failed write left buffered
                cannot_write(exc)


def warm(source: Path | None, model: str, nvme_dir_template: str, capacity_bytes: int, comm=None,
         progress_stream=None) -> int:
    """The collective warm; returns the exit status (0 only when every rank committed its verified copy)."""
    from hpcllm.mpi import comm_world

    comm = comm if comm is not None else comm_world()  # without mpi4py: MpiUnavailableError, saying what to install
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    started = time.perf_counter()
    node = node_name()

    described, origin_error = _describe_origin(model, source) if is_root else (None, "")
    described, origin_error = comm.bcast((described, origin_error), root=0)  # small: JSON + side files
    if origin_error:
        if is_root:
            print(f"error: {origin_error}", file=sys.stderr, flush=True)
        return 1

    fill = RankFill(model, Path(nvme_dir_template), capacity_bytes)
    try:
        fill.nvme_dir = nvme_dir_for(nvme_dir_template, node, rank)
    except HpcllmError as exc:  # an unset $VARIABLE may be this node's alone: fail with the others, in the collectives
        fill.fail(str(exc))
    try:
        fill.prepare(described["need"], described["small"][MANIFEST_FILE])
        for name, data in described["small"].items():
            fill.write_small(name, data)
        manifest_ckpt = None
        if fill.writing:
            try:
                manifest_ckpt = read_checkpoint(fill.tmp)  # the manifest/index just written: chunk checksums
            except CheckpointError as exc:
                fill.fail(f"the broadcast manifest does not parse: {exc}")
        progress = _progress_printer(described, progress_stream) if is_root and progress_stream else None
        for index, part in enumerate(described["partitions"]):
            _receive_partition(fill, part, index, comm, is_root, source if is_root else Path("."),
                               manifest_ckpt, progress)
        fill.verify()

        results = comm.gather((rank, node, str(fill.nvme_dir), fill.error, fill.already_cached), root=0)
        all_ok = comm.allreduce(0 if fill.error else 1, op=MPI.MIN)
        if all_ok:
            try:
                fill.commit(described["source"])
            except OSError as exc:
                fill.fail(f"cannot rename into {fill.nvme_dir / model}: {_why(exc)}")
        else:
            fill.abandon()
        committed = comm.allreduce(0 if fill.error else 1, op=MPI.MIN)
        commit_errors = comm.gather((rank, node, fill.error), root=0)
    finally:
        fill.abandon()
        fill.close()

    if is_root:
        _report(model, described, results, commit_errors, bool(all_ok), time.perf_counter() - started, size)
    return 0 if all_ok and committed else 1


def _progress_printer(described: dict, stream):
    total = sum(p["size"] for p in described["partitions"]) or 1
    state = {"done": 0, "shown": -1}

    def step(nbytes: int) -> None:
        state["done"] += nbytes
        percent = state["done"] * 100 // total
        if percent // 10 != state["shown"]:
            state["shown"] = percent // 10
            print(f"{RESULT_PREFIX} progress {state['done']} {total}", file=stream, flush=True)

    return step


def _report(model: str, described: dict, results: list, commit_errors: list, all_ok: bool, seconds: float,
            ranks: int) -> None:
    data_bytes = sum(p["size"] for p in described["partitions"])
    if not all_ok:
        failed = [f"rank {r} on {n} ({d}): {e}" for r, n, d, e, _ in results if e]
        print(f"error: warming {model!r} failed on {len(failed)} of {ranks} ranks; nothing was committed on any "
              f"node: " + "; ".join(failed), file=sys.stderr, flush=True)
        return
    for rank, node, nvme_dir, _, already in results:
        state = "already-cached" if already else "verified"
        print(f"{RESULT_PREFIX} rank {rank} node {node} {state} {Path(nvme_dir) / model}", flush=True)
    late = [f"rank {r} on {n}: {e}" for r, n, e in commit_errors if e]
    if late:
        print(f"error: warming {model!r}: every copy verified but renaming failed on: " + "; ".join(late),
              file=sys.stderr, flush=True)
        return
    rate = data_bytes / seconds / 1e9 if seconds > 0 else 0.0
    print(f"{RESULT_PREFIX} ok model {model} ranks {ranks} bytes {data_bytes} seconds {seconds:.3f} "
          f"({rate:.2f} GB/s read once from {described['source']})", flush=True)


# Temporary folders this rank is writing: removed at once if the job is cancelled.
_REMOVE_ON_CANCEL: set[Path] = set()


def _remove_partial_copies_on_sigterm() -> None:
    """scancel (and the CLI's Ctrl-C, which cancels the job) sends SIGTERM. The main thread may then be inside an MPI
    call that will never return (a peer already died), where a Python signal handler never runs and only SIGKILL
    (KillWait later) ends the rank. So SIGTERM is blocked for every thread and this one waits for it, removes the
    temporary folder and exits. (A SIGKILLed rank's folder goes with the next look at the cache: CacheManager
    removes fills of dead processes.)"""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before MPI starts threads: they inherit it

    def wait_for_sigterm() -> None:
        signal.sigwait({signal.SIGTERM})
        for folder in list(_REMOVE_ON_CANCEL):
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait_for_sigterm, name="sigterm", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcllm.node.mpiwarm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="converted checkpoint on the shared FS")
    parser.add_argument("--model", required=True, help="model name (the cache folder's name)")
    parser.add_argument("--tier", default=NVME, choices=[NVME],
                        help="only nvme: warm DRAM afterwards from the node's NVMe copy (hpcllm cache warm)")
    parser.add_argument("--nvme-dir-template", required=True,
                        help="each rank's NVMe cache folder; {node} = $SLURMD_NODENAME, {rank} = MPI rank")
    parser.add_argument("--nvme-capacity-gb", type=float, default=None,
                        help="NVMe tier capacity (default: [node] nvme_capacity_gb of the config)")
    parser.add_argument("--progress", action="store_true", help="rank 0 prints progress lines to stderr")
    args = parser.parse_args(argv)
    _remove_partial_copies_on_sigterm()
    try:
        check_model_name(args.model)
        capacity = args.nvme_capacity_gb
        if capacity is None:
            from hpcllm.config import load_config

            capacity = load_config().node.nvme_capacity_gb
        return warm(args.source, args.model, args.nvme_dir_template, int(capacity * 1e9),
                    progress_stream=sys.stderr if args.progress else None)
    except HpcllmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return getattr(exc, "exit_code", 1) or 1


if __name__ == "__main__":
    sys.exit(main())
