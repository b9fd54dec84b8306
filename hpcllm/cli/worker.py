"""`hpcllm worker`: serve one model instance, as one process or as the ranks of a tensor-parallel instance.

The command lives here, above both hpcllm.worker (one process) and hpcllm.tp (which builds on the worker), so
neither package imports the other back.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from hpcllm.config import EngineName, load_config
from hpcllm.logs import setup_service_logging
from hpcllm.node.identity import node_name
from hpcllm.tp.worker import run_tensor_parallel_worker
from hpcllm.worker.cli import run_worker


def _node_slice_copies(config, model: str, model_path: Path):
    """Each rank's lookup of its node's slice copy (hpcllm cache warm MODEL --tensor-parallel N); none when the
    model is loaded from a DRAM copy, which serves every rank faster than a copy on disk."""
    from hpcllm.node.cache import node_slice_copy
    from hpcllm.store.tiers import detect_tier

    if detect_tier(model_path) == "dram":
        return None
    return lambda degree, rank: node_slice_copy(config.node, model, degree, rank)


def _node_model_copy(config, model: str, model_path: Path) -> Path | None:
    """A rank's own node's whole NVMe copy of the checkpoint at model_path (the origin the agent gives every rank of
    an instance spanning nodes); None when the node has none, or model_path is a node copy already."""
    from hpcllm.node.cache import node_model_copy
    from hpcllm.store.tiers import detect_tier

    if detect_tier(model_path) == "dram":
        return None
    copy = node_model_copy(config.node, model, model_path)
    return copy if copy is not None and copy.resolve() != model_path.resolve() else None


def _lora_modules(values: tuple[str, ...]) -> dict[str, str]:
    """--lora-module NAME=PATH options (vLLM's --lora-modules) as {name: folder}."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise click.BadParameter(f"{value!r} is not NAME=PATH (an adapter name and its PEFT folder)",
                                     param_hint="--lora-module")
        if name in adapters:
            raise click.BadParameter(f"adapter {name!r} is given twice", param_hint="--lora-module")
        adapters[name] = folder
    return adapters


def _check_mode_options(tensor_parallel: bool, engine: str, cache_into: Path | None, stop_signal: str | None,
                        lora_adapters: dict[str, str] | None = None) -> None:
    """Options that one mode would silently ignore are refused, so a worker never runs other than asked."""
    if tensor_parallel and lora_adapters:
        raise click.UsageError("--lora-module is not supported with --tensor-parallel yet (serve adapters on a "
                               "single-process worker)")
    if tensor_parallel and engine != "hpcllm":
        raise click.UsageError("--tensor-parallel runs hpcllm's engine only; leave out --engine vllm (a vLLM model "
                               "runs as one process)")
    if tensor_parallel and cache_into is not None:
        raise click.UsageError("--cache-into fills a node cache from a single worker's load; a tensor-parallel "
                               "instance's ranks read slices (warm them with `hpcllm cache warm --tensor-parallel`)")
    if not tensor_parallel and stop_signal is not None:
        raise click.UsageError("--stop-signal only applies with --tensor-parallel (a single worker stops on "
                               "SIGTERM or SIGINT)")


@click.command("worker")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Converted checkpoint folder (hpcllm convert), loaded through hpcllm's tiered loader.")
@click.option("--name", "model_name", default=None, help="Model name in metrics and /ready. Default: folder name.")
@click.option("--host", default=None, help="Address to bind. Default: worker.listen_host (127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 picks a free port.")
@click.option("--device", default=None, help='"cpu", "cuda" or "cuda:N". Default: worker.device.')
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Context limit (prompt + output), at most the model's. Default: the model's context length "
                   "from its config (as `hpcllm deploy` derives it).")
@click.option("--url-file", type=click.Path(path_type=Path), default=None,
              help="Write the worker's URL here (atomically) once the port is bound.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="hpcllm TOML config (default: $HPCLLM_CONFIG, else built-in defaults).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch compute threads. Default: worker.cpu_threads, else torch's own (every core).")
@click.option("--engine", type=click.Choice(get_args(EngineName)), default="hpcllm", show_default=True,
              help="hpcllm's engine, or vLLM (run this with the interpreter of `make vllm-venv`).")
@click.option("--cache-into", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Empty folder (given by the node agent): also write the checkpoint bytes the load reads there, "
                   "for the node's cache (cache on load). hpcllm engine only.")
@click.option("--tensor-parallel", is_flag=True,
              help="Run as one rank of a tensor-parallel instance started by mpirun / srun --mpi=pmix: the MPI world "
                   "size is the degree; rank 0 serves HTTP, the other ranks follow its steps (docs/tensor-parallel.md).")
@click.option("--lora-module", "lora_modules", multiple=True, metavar="NAME=PATH",
              help="Serve the PEFT LoRA adapter in folder PATH as NAME (repeatable); a request names it in its "
                   "`lora` field (docs/worker.md, \"LoRA adapters\").")
@click.option("--stop-signal", default=None,
              help="With --tensor-parallel: the signal that stops the instance, sent to the lead rank or to "
                   "mpirun / srun, which forward it (default TERM). With another signal every rank ignores SIGTERM. "
                   "The node agent passes USR2 (to mpirun TERM where slurm.signal is USR2): under srun Slurm may send "
                   "SIGTERM to every step when it preempts the job (the agent migrates the streams first, then stops "
                   "the instance), and mpirun answers SIGTERM by killing ranks still shutting down (exit 1).")
def worker(model_path: Path, model_name: str | None, host: str | None, port: int, device: str | None,
           max_model_len: int | None, url_file: Path | None, config_path: Path | None, threads: int | None,
           engine: str, cache_into: Path | None, tensor_parallel: bool, stop_signal: str | None,
           lora_modules: tuple[str, ...] = ()) -> None:
    """Serve one model: internal NDJSON generate API, /health, /ready, /metrics."""
    lora_adapters = _lora_modules(lora_modules)
    _check_mode_options(tensor_parallel, engine, cache_into, stop_signal, lora_adapters)
    setup_service_logging()
    # A service like the gateway and the agent: a config holding the cluster's secret must be this user's alone.
    config = load_config(config_path, private=True)
    if tensor_parallel:
        name = model_name or model_path.name
        run_tensor_parallel_worker(config, model_path, model_name, host, port, device, max_model_len, url_file,
                                   threads, stop_signal or "TERM", slice_copy_for=_node_slice_copies(config, name, model_path),
                                   node=node_name(), node_copy=_node_model_copy(config, name, model_path))
        return
    run_worker(config, model_path, model_name, host, port, device, max_model_len, url_file, threads, engine,
               cache_into, lora_adapters=lora_adapters)
