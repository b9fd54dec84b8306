"""`hpcllm slurm ...`: look at Slurm through the configured backend and render the batch scripts."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import click

from hpcllm.config import load_config
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import JOB_ID_PATTERN
from hpcllm.slurm.factory import get_backend

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="hpcllm config file (default: $HPCLLM_CONFIG, else built-in defaults)")


@click.group()
def slurm() -> None:
    """Slurm as hpcllm sees it (backend from [slurm] backend), and its batch scripts."""


@slurm.command()
@config_option
def nodes(config_path: str | None) -> None:
    """Nodes with their state and GPUs in use."""
    backend = get_backend(load_config(config_path).slurm)
    rows = [("NODE", "STATE", "PARTITIONS", "GPUS USED/TOTAL", "CPUS USED/TOTAL")]
    for node in backend.nodes():
        state = "+".join((node.state, *node.state_flags))
        rows.append((node.name, state, ",".join(node.partitions), f"{node.gpus_used}/{node.gpus_total}",
                     f"{node.cpus_allocated}/{node.cpus_total}"))
    _table(rows)


@slurm.command()
@config_option
@click.argument("job_ids", nargs=-1, required=True)
def jobs(config_path: str | None, job_ids: tuple[str, ...]) -> None:
    """State of jobs (one Slurm call for all of them)."""
    bad = [job_id for job_id in job_ids if not re.fullmatch(JOB_ID_PATTERN, job_id)]
    if bad:  # squeue would answer with an error of its own, or not at all
        raise click.BadParameter(f"{', '.join(map(repr, bad))}: a Slurm job id is a number (array task 12_3, "
                                 f"heterogeneous component 12+1)", param_hint="JOB_IDS")
    backend = get_backend(load_config(config_path).slurm)
    rows = [("JOB", "STATE", "SLURM STATE", "NODES", "RESTARTS", "REASON")]
    for job_id, status in backend.statuses(list(job_ids)).items():
        rows.append((job_id, status.state.value, status.raw_state or "-", ",".join(status.nodes) or "-",
                     str(status.restart_count), status.reason or "-"))
    _table(rows)


@slurm.group()
def render() -> None:
    """Print (or write) a batch script."""


@render.command("model-pool")
@click.option("--model", help="deployed model name the pool serves")
@click.option("--gpus", type=click.IntRange(0), help="GPUs per node")
@click.option("--time", "walltime", help="walltime, e.g. 08:00:00")
@click.option("--nodes", type=click.IntRange(1), help="nodes (one node agent each)")
@click.option("--partition")
@click.option("-o", "--output", "output_file", type=click.Path(dir_okay=False), help="write here instead of stdout")
def render_model_pool_command(model, gpus, walltime, nodes, partition, output_file) -> None:
    """The user-facing model pool script (slurm/model-pool.sbatch) with other defaults."""
    from hpcllm.slurm.templates import render_model_pool

    _emit(render_model_pool(model=model, gpus=gpus, time=walltime, nodes=nodes, partition=partition),
          output_file)


@render.command("node-agent")
@config_option
@click.option("--nodes", type=click.IntRange(1), default=1, show_default=True)
@click.option("--gpus", type=click.IntRange(0), help="GPUs per node (default: [slurm] gpus_per_node)")
@click.option("-o", "--output", "output_file", type=click.Path(dir_okay=False), help="write here instead of stdout")
def render_node_agent_command(config_path, nodes, gpus, output_file) -> None:
    """The node-agent allocation job the controller submits, from the [slurm] config."""
    from hpcllm.slurm.templates import node_agent_job_spec, render_batch_script

    spec = node_agent_job_spec(load_config(config_path), nodes=nodes, gpus_per_node=gpus)
    _emit(render_batch_script(spec), output_file)


def _emit(text: str, output_file: str | None) -> None:
    if output_file is None:
        click.echo(text, nl=False)
        return
    path = Path(output_file)
    if path.name in ("", "..") or output_file.endswith("/"):  # Path("") is ".": no file to write
        raise click.BadParameter(f"{output_file!r} names no file: give the script's file path",
                                 param_hint="'-o' / '--output'")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a half-written script must not stay behind
            tmp.unlink()
        raise ConfigError(f"cannot write {path} ({exc.strerror}); choose an output file in an existing folder you "
                          f"may write to") from None
    click.echo(f"wrote {path}", err=True)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
