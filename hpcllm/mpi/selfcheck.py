"""Checks that a file broadcast over MPI arrives intact on every rank.

    mpirun -n 2 python -m hpcllm.mpi.selfcheck FILE [--dest-dir DIR] [--chunk-bytes N]
    srun --mpi=pmix -N2 -n2 python -m hpcllm.mpi.selfcheck FILE

Rank 0 reads FILE; every rank receives it with bcast_file_chunks (or, with --dest-dir, writes it to
DIR/rank<N>-<name> with bcast_file_to, as cache warming does). Rank 0 then compares every rank's SHA-256 with the
file's own, prints one line per rank and the verdict; all ranks exit 0 only if every rank got identical bytes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import click

from hpcllm.errors import HpcllmError
from hpcllm.mpi.broadcast import DEFAULT_CHUNK_BYTES, bcast_file_chunks, bcast_file_to
from hpcllm.mpi.comm import comm_world

ROOT = 0


def _sha256_of_file(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            hasher.update(block)
            size += len(block)
    return size, hasher.hexdigest()


def _receive(comm, path: Path, dest_dir: Path | None, chunk_bytes: int) -> tuple[int, str]:
    source = path if comm.Get_rank() == ROOT else None
    if dest_dir is not None:
        destination = dest_dir / f"rank{comm.Get_rank()}-{path.name}"
        bcast_file_to(source, destination, root=ROOT, chunk_bytes=chunk_bytes, comm=comm)
        return _sha256_of_file(destination)
    hasher = hashlib.sha256()
    size = 0
    for chunk in bcast_file_chunks(source, root=ROOT, chunk_bytes=chunk_bytes, comm=comm):
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--dest-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the received file to DIR/rank<N>-<name> on every rank (temporary name, then rename).",
)
@click.option("--chunk-bytes", type=click.IntRange(min=1), default=DEFAULT_CHUNK_BYTES, show_default=True)
def main(path: Path, dest_dir: Path | None, chunk_bytes: int) -> None:
    comm = comm_world()
    rank = comm.Get_rank()
    from mpi4py import MPI

    node = os.environ.get("SLURMD_NODENAME") or MPI.Get_processor_name()
    size = digest = None
    try:
        size, digest = _receive(comm, path, dest_dir, chunk_bytes)
    except HpcllmError as error:
        # Still reported in the gather below: a failure of this rank alone (its write, a digest that differs) would
        # otherwise leave the ranks that got the file waiting there for it.
        click.echo(f"error: rank {rank} on {node}: {error}", err=True)

    reports = comm.gather((rank, node, size, digest), root=ROOT)
    all_identical = False
    if rank == ROOT:
        expected = _expected(path, node, reported=size is not None)
        all_identical = expected is not None
        for peer, peer_node, peer_size, peer_digest in reports:
            matches = (peer_size, peer_digest) == expected
            all_identical &= matches
            if peer_size is None:
                click.echo(f"rank {peer} on {peer_node}: FAILED (its error above)")
                continue
            verdict = "ok" if matches else "MISMATCH"
            click.echo(f"rank {peer} on {peer_node}: {peer_size} bytes sha256 {peer_digest} {verdict}")
        nodes = sorted({report[1] for report in reports})
        if all_identical:
            click.echo(f"ok: {len(reports)} ranks on {len(nodes)} node(s) ({', '.join(nodes)}) received identical bytes")
        else:
            click.echo(f"FAILED: some ranks did not receive {path} intact"
                       + (f" ({expected[0]} bytes)" if expected else ""), err=True)
    all_identical = comm.bcast(all_identical, root=ROOT)
    sys.exit(0 if all_identical else 1)


def _expected(path: Path, node: str, reported: bool) -> tuple[int, str] | None:
    """Size and SHA-256 of the file itself; None when root cannot read it again. Its error is printed here unless
    root's own receive failed already (`reported` False: that error is above)."""
    try:
        return _sha256_of_file(path)
    except OSError as error:
        if reported:
            click.echo(f"error: rank {ROOT} on {node}: cannot read {path}: {error.strerror}", err=True)
        return None


if __name__ == "__main__":
    main()
