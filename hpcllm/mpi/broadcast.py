"""Pipelined chunked broadcast of one file from one rank to all ranks (cache warming).

One rank (root) reads the file; every rank receives it chunk by chunk. Chunks travel with MPI's buffer API
(Ibcast on numpy uint8 arrays, no pickling) through two buffers: chunk k+1 is already being read and sent while the
caller handles chunk k, so reading, the network and the caller's writes overlap.

Protocol, the same collective calls in the same order on every rank:
1. header Bcast: [status, size, chunk_bytes] from root (status != 0: root could not open the file; its message
   follows and all ranks raise);
2. the chunks, ceil(size / chunk_bytes) of them, each in Ibcasts of at most MAX_MESSAGE_BYTES (MPI's count limit);
3. trailer Bcast: [failed, xxh3-64 digest of the bytes root sent] (failed: root's message follows). Every rank
   hashes what it received and raises BroadcastError at the end if root failed mid-way (file shrank) or the
   digests differ. Callers therefore commit
   what they wrote only after the generator finished (bcast_file_to does: temporary name, then rename).
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import xxhash

from hpcllm.errors import HpcllmError
from hpcllm.mpi.comm import comm_world

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
# MPI counts are C ints: one message of bytes holds at most 2**31 - 1 of them. Without MPI-4's large counts a larger
# message is refused (MPI_ERR_ARG with mpi4py 4.1.2 + Open MPI 4.1.4 here, OverflowError on older mpi4py), so a
# larger chunk goes out in several messages.
MAX_MESSAGE_BYTES = 2**31 - 1
_OK, _ROOT_FAILED = 0, 1


class BroadcastError(HpcllmError):
    """The broadcast failed; the same error is raised on every rank so none waits forever."""


def bcast_file_chunks(
    path: str | os.PathLike[str] | None,
    *,
    root: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    comm: Any = None,
) -> Iterator[memoryview]:
    """Yields the file at `path` (read on rank `root`; other ranks pass None) chunk by chunk on every rank.

    Each yielded memoryview is valid only until the next iteration (its buffer is reused): copy or write it out
    before asking for the next one. Every rank must consume the generator to the end (the chunks are collective
    calls); stopping early on one rank leaves the others waiting. Root's chunk_bytes is used by all ranks. Raises BroadcastError on every rank
    when root cannot read the file or the received bytes do not match root's digest.
    """
    comm = comm if comm is not None else comm_world()
    if not 0 <= root < comm.Get_size():
        raise BroadcastError(f"root rank {root} does not exist: the communicator has {comm.Get_size()} ranks")
    is_root = comm.Get_rank() == root
    source, header, root_error = _open_on_root(path, chunk_bytes) if is_root else (None, None, "")

    header = header if header is not None else np.zeros(3, dtype=np.int64)
    comm.Bcast(header, root=root)
    status, size, chunk = (int(v) for v in header)
    if status != _OK:
        # Error path only: root's message is small, so the pickling bcast is fine here.
        root_error = comm.bcast(root_error, root=root)
        raise BroadcastError(root_error if is_root else f"rank {root}: {root_error}")

    try:
        digest = xxhash.xxh3_64()
        root_short_read = ""
        buffers = [np.empty(min(chunk, size), dtype=np.uint8) for _ in range(2)]
        n_chunks = -(-size // chunk)

        def post(index: int) -> tuple[list[Any], np.ndarray]:
            nonlocal root_short_read
            view = buffers[index % 2][: min(chunk, size - index * chunk)]
            if is_root and not root_short_read:
                root_short_read = _read_exactly(source, view, offset=index * chunk, path=path)
            return [comm.Ibcast(view[at:at + MAX_MESSAGE_BYTES], root=root)
                    for at in range(0, len(view), MAX_MESSAGE_BYTES)], view

        in_flight: deque[tuple[list[Any], np.ndarray]] = deque()
        if n_chunks:
            in_flight.append(post(0))
        for index in range(n_chunks):
            if index + 1 < n_chunks:
                in_flight.append(post(index + 1))
            requests, view = in_flight.popleft()
            for request in requests:
                request.Wait()
            digest.update(view)
            yield memoryview(view)
    finally:
        if source is not None:
            source.close()

    trailer = np.zeros(2, dtype=np.uint64)
    if is_root:
        trailer[:] = (_ROOT_FAILED if root_short_read else _OK, digest.intdigest())
    comm.Bcast(trailer, root=root)
    if int(trailer[0]) != _OK:
        root_short_read = comm.bcast(root_short_read, root=root)
        raise BroadcastError(root_short_read if is_root else f"rank {root}: {root_short_read}")
    if int(trailer[1]) != digest.intdigest():
        raise BroadcastError(
            f"rank {comm.Get_rank()} received {size} bytes whose xxh3-64 digest differs from what rank {root} sent"
        )


def _open_on_root(path: str | os.PathLike[str] | None, chunk_bytes: int) -> tuple[BinaryIO | None, np.ndarray, str]:
    """Opens the file on root; returns (file, header, error message). Never raises: the error travels in header."""
    header = np.zeros(3, dtype=np.int64)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        header[0] = 1
        return None, header, f"chunk_bytes must be a positive integer, got {chunk_bytes!r}"
    if path is None:
        header[0] = 1
        return None, header, "the root rank must pass the path of the file to broadcast, got None"
    try:
        source = open(path, "rb", buffering=0)
        size = os.fstat(source.fileno()).st_size
    except OSError as error:
        header[0] = 1
        return None, header, f"cannot read {path}: {error.strerror}"
    header[:] = (_OK, size, chunk_bytes)
    return source, header, ""


def _read_exactly(source: BinaryIO, view: np.ndarray, *, offset: int, path: Any) -> str:
    """Fills view from the file at offset; returns an error message (view zero-filled past the data) on a short read."""
    filled = 0
    target = memoryview(view)
    try:
        while filled < len(view):
            count = os.preadv(source.fileno(), [target[filled:]], offset + filled)
            if count == 0:
                break
            filled += count
    except OSError as error:
        view[filled:] = 0
        return f"reading {path} failed at byte {offset + filled}: {error.strerror}"
    if filled < len(view):
        view[filled:] = 0
        return f"{path} shrank while being broadcast: expected more bytes at offset {offset + filled}"
    return ""


def bcast_file_to(
    path: str | os.PathLike[str] | None,
    destination: str | os.PathLike[str],
    *,
    root: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    comm: Any = None,
) -> int:
    """Broadcasts the file at `path` (on root) into `destination` on every rank; returns its size in bytes.

    The file is written under a temporary name (unique per rank, so ranks sharing a filesystem do not collide)
    and renamed to `destination` only after the whole broadcast checked out; on any error nothing is left behind.
    """
    comm = comm if comm is not None else comm_world()
    destination = Path(destination)
    temporary = destination.with_name(f".{destination.name}.part-{comm.Get_rank()}-{os.getpid()}")
    # Every rank joins the whole broadcast even when it cannot write, so the other ranks do not wait forever.
    write_error: OSError | None = None
    sink: BinaryIO | None = None
    written = 0
    try:
        try:
            sink = open(temporary, "wb")
        except OSError as error:
            write_error = error
        for chunk in bcast_file_chunks(path, root=root, chunk_bytes=chunk_bytes, comm=comm):
            if sink is not None and write_error is None:
                try:
                    sink.write(chunk)
                    written += len(chunk)
                except OSError as error:
                    write_error = error
        if write_error is None:
            try:  # the last buffered bytes are written at the close; the rename can fail too (a folder there)
                sink.close()
                os.replace(temporary, destination)
            except OSError as error:
                write_error = error
        if write_error is not None:
            raise BroadcastError(f"rank {comm.Get_rank()} cannot write {destination}: {write_error.strerror}")
    except BaseException:
        if sink is not None:
            sink.close()
        temporary.unlink(missing_ok=True)
        raise
    return written
