"""`hpcllm tp`: tensor-parallel views of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from hpcllm.checkpoint import read_checkpoint
from hpcllm.checkpoint.cli import _human


@click.group("tp")
def tp() -> None:
    """Tensor parallelism: what each rank of an instance would read (docs/tensor-parallel.md)."""


@tp.command("plan")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--degree", type=click.IntRange(min=1), required=True, help="Ranks per instance (tensor_parallel).")
def plan(path: Path, degree: int) -> None:
    """Bytes and read requests each of DEGREE ranks would read from PATH (planned from the index, nothing read);
    refused with the numbers when DEGREE does not split the model."""
    from hpcllm.tp.mpiload import estimate_rank_reads

    ckpt = read_checkpoint(path)
    for rank, (nbytes, reads) in enumerate(estimate_rank_reads(ckpt.root, degree)):
        click.echo(f"tensor_parallel = {degree}: rank {rank} reads {_human(nbytes)} "
                   f"({nbytes / max(ckpt.total_bytes, 1):.0%} of the data files) in {reads} read(s)")
