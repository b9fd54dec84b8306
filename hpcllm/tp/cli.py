"""`hpcllm tp`: tensor-parallel views of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from hpcllm.checkpoint import read_checkpoint
from hpcllm.present import human_size


@click.group("tp")
def tp() -> None:
    """Tensor parallelism: what each rank of an instance would read (docs/tensor-parallel.md)."""


@tp.command("plan")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--degree", type=click.IntRange(min=1), required=True, help="Ranks per instance (tensor_parallel).")
@click.option("--gap-bytes", type=click.IntRange(min=0), default=None,
              help="Coalescing gap of the reads (default: the loader's; 0: one read per row of a dim-1 slice).")
def plan(path: Path, degree: int, gap_bytes: int | None) -> None:
    """Bytes and read requests each of DEGREE ranks would read from PATH (planned from the index, nothing read),
    by kind of slice, and from a slice copy on the rank's node; refused with the numbers when DEGREE does not split
    the model."""
    from hpcllm.tp.mpiload import rank_read_plans

    ckpt = read_checkpoint(path)
    for p in rank_read_plans(ckpt.root, degree, gap_bytes):
        nbytes, reads = p.total
        click.echo(f"tensor_parallel = {degree}: rank {p.rank} reads {human_size(nbytes)} "
                   f"({nbytes / max(ckpt.total_bytes, 1):.0%} of the data files) in {reads} read(s)")
        dim1 = f"{human_size(p.dim1[0])} in {p.dim1[1]} read(s)"
        if p.dim1_share_bytes:
            dim1 += f", {p.dim1[0] / p.dim1_share_bytes:.1f}x its share of {human_size(p.dim1_share_bytes)}"
        click.echo(f"  dim 0 (colwise) {human_size(p.dim0[0])} in {p.dim0[1]} read(s); dim 1 (rowwise) {dim1}; "
                   f"replicated {human_size(p.replicated[0])} in {p.replicated[1]} read(s)")
        click.echo(f"  from its slice copy (hpcllm cache warm --tensor-parallel {degree}): "
                   f"{human_size(p.slice_copy[0])} in {p.slice_copy[1]} read(s), one per tensor")
