"""bcast_file_chunks / bcast_file_to on one rank, in this process, without MPI.

A one-rank communicator delivers root's own buffers, so these tests cover reading, chunking, hashing, atomic
writes and every error path; test_mpirun.py runs the same code across real MPI ranks.
"""

from __future__ import annotations

import os

import pytest

from hpcllm.mpi import BroadcastError, bcast_file_chunks, bcast_file_to
from hpcllm.mpi.tests.fakes import OneRankWorld


@pytest.fixture
def payload(tmp_path):
    data = os.urandom(100_003)  # not a multiple of the chunk size
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    return path, data


def test_chunks_reassemble_the_file(payload):
    path, data = payload
    chunks = [bytes(chunk) for chunk in bcast_file_chunks(path, chunk_bytes=4096, comm=OneRankWorld())]
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks[:-1]] == [4096] * (len(chunks) - 1)
    assert len(chunks) == -(-len(data) // 4096)


def test_empty_file_yields_nothing(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert list(bcast_file_chunks(empty, comm=OneRankWorld())) == []


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BroadcastError, match=r"cannot read .*missing\.bin: No such file"):
        list(bcast_file_chunks(tmp_path / "missing.bin", comm=OneRankWorld()))


def test_root_without_a_path_is_an_error():
    with pytest.raises(BroadcastError, match="root rank must pass the path"):
        list(bcast_file_chunks(None, comm=OneRankWorld()))


@pytest.mark.parametrize("chunk_bytes", [0, -5, 1.5])
def test_bad_chunk_size_is_an_error(payload, chunk_bytes):
    with pytest.raises(BroadcastError, match="chunk_bytes must be a positive integer"):
        list(bcast_file_chunks(payload[0], chunk_bytes=chunk_bytes, comm=OneRankWorld()))


def test_root_outside_the_communicator_is_an_error(payload):
    with pytest.raises(BroadcastError, match="root rank 3 does not exist"):
        list(bcast_file_chunks(payload[0], root=3, comm=OneRankWorld()))


def test_file_shrinking_mid_broadcast_fails_at_the_end(payload):
    path, _ = payload
    chunks = bcast_file_chunks(path, chunk_bytes=4096, comm=OneRankWorld())
    next(chunks)  # chunk 1 is already read ahead; the file then loses its tail
    os.truncate(path, 10_000)
    with pytest.raises(BroadcastError, match="shrank while being broadcast"):
        list(chunks)


def test_bcast_file_to_writes_the_file_atomically(payload, tmp_path):
    path, data = payload
    destination = tmp_path / "cache" / "copy.bin"
    destination.parent.mkdir()
    assert bcast_file_to(path, destination, chunk_bytes=8192, comm=OneRankWorld()) == len(data)
    assert destination.read_bytes() == data
    assert sorted(p.name for p in destination.parent.iterdir()) == ["copy.bin"]


def test_bcast_file_to_leaves_nothing_when_the_source_breaks(payload, tmp_path):
    path, _ = payload
    destination = tmp_path / "cache" / "copy.bin"
    destination.parent.mkdir()
    with pytest.raises(BroadcastError, match="cannot read"):
        bcast_file_to(tmp_path / "missing.bin", destination, comm=OneRankWorld())
    assert list(destination.parent.iterdir()) == []


def test_bcast_file_to_unwritable_destination_is_a_clear_error(payload, tmp_path):
    path, _ = payload
    destination = tmp_path / "no-such-dir" / "copy.bin"
    with pytest.raises(BroadcastError, match=r"rank 0 cannot write .*copy\.bin"):
        bcast_file_to(path, destination, comm=OneRankWorld())
    assert not destination.parent.exists()


def test_bcast_file_to_a_destination_it_cannot_replace_is_a_clear_error(payload, tmp_path):
    """The received file is written, but renaming it to a destination that is a folder fails: that surfaced as a
    bare IsADirectoryError (a traceback in `python -m hpcllm.mpi.selfcheck`, whose ranks report BroadcastErrors)."""
    path, _ = payload
    destination = tmp_path / "cache" / "copy.bin"
    destination.mkdir(parents=True)
    with pytest.raises(BroadcastError, match=r"rank 0 cannot write .*copy\.bin: Is a directory"):
        bcast_file_to(path, destination, comm=OneRankWorld())
    assert [p.name for p in destination.parent.iterdir()] == ["copy.bin"] and not any(destination.iterdir())


def test_no_message_is_larger_than_mpi_can_count(payload, monkeypatch):
    # A chunk went out as one Ibcast: MPI counts are 32-bit, so a chunk over 2 GiB (--chunk-bytes of the self-check,
    # or any caller's chunk_bytes) was refused on every rank by an MPI without large counts (MPI_ERR_ARG, or
    # OverflowError on older mpi4py). Each chunk is now sent in messages of at most MAX_MESSAGE_BYTES, back to back;
    # the caller still gets whole chunks.
    from hpcllm.mpi import broadcast

    path, data = payload
    monkeypatch.setattr(broadcast, "MAX_MESSAGE_BYTES", 1000)
    world = OneRankWorld()
    chunks = [bytes(chunk) for chunk in bcast_file_chunks(path, chunk_bytes=4096, comm=world)]
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks[:-1]] == [4096] * (len(chunks) - 1)
    # Between the header and the trailer: 24 chunks of 4096 bytes (messages of 1000, 1000, 1000, 1000, 96 each),
    # then the last chunk of 1699 bytes (1000, 699), in order, none overlapping or left out.
    assert len(data) == 24 * 4096 + 1699
    assert world.messages[1:-1] == ([1000] * 4 + [96]) * 24 + [1000, 699]
