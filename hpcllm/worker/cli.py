"""`hpcllm worker --model PATH`: serve one converted checkpoint on the worker's internal HTTP API.

The node agent starts this (or calls `run_worker` in a warm process with imports done). The shared secret comes
from the config's cluster.shared_secret or the HPCLLM_SHARED_SECRET environment variable, never from the command
line, where other users of the node could read it with ps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from hpcllm.config import Config, load_config
from hpcllm.errors import ConfigError

SECRET_ENV = "HPCLLM_SHARED_SECRET"


def run_worker(
    config: Config,
    model_path: Path,
    model_name: str | None = None,
    host: str | None = None,
    port: int = 0,
    device: str | None = None,
    max_model_len: int | None = None,
    url_file: Path | None = None,
    threads: int | None = None,
    loader=None,
) -> None:
    """Serve model_path until SIGTERM. Imports torch/transformers here, so callers can pre-import to warm up.

    `loader` (returns a ModelForServing) replaces the tiered single-device load (tensor parallelism's lead)."""
    if not model_path.exists():
        raise ConfigError(f"model checkpoint {model_path} does not exist; pass the converted checkpoint folder")
    import torch

    from hpcllm.worker.server import WorkerService, load_with_hpcllm, serve

    worker = config.worker
    threads = threads or worker.cpu_threads
    if threads:  # set here, not via OMP_NUM_THREADS: a spare worker's OpenMP runtime started before its assignment
        torch.set_num_threads(threads)
    device = device or worker.device
    service = WorkerService(
        model_name or model_path.name,
        secret=os.environ.get(SECRET_ENV) or config.cluster.shared_secret,
        keepalive_seconds=worker.keepalive_seconds,
        max_model_len=max_model_len,
        max_running_requests=worker.max_running_requests,
        max_waiting_requests=worker.max_waiting_requests,
        prefill_chunk_tokens=worker.prefill_chunk_tokens,
    )
    serve(
        service,
        loader=loader or (lambda: load_with_hpcllm(model_path, device)),
        host=host or worker.listen_host,
        port=port,
        url_file=url_file,
        on_listening=lambda url: click.echo(f"hpcllm worker for {service.model_name} listening on {url}", err=True),
    )


@click.command("worker")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Converted checkpoint folder (hpcllm convert), loaded through hpcllm's tiered loader.")
@click.option("--name", "model_name", default=None, help="Model name in metrics and /ready. Default: folder name.")
@click.option("--host", default=None, help="Address to bind. Default: worker.listen_host (127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 picks a free port.")
@click.option("--device", default=None, help='"cpu", "cuda" or "cuda:N". Default: worker.device.')
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Context limit (prompt + output). Default: the model's max_position_embeddings.")
@click.option("--url-file", type=click.Path(path_type=Path), default=None,
              help="Write the worker's URL here (atomically) once the port is bound.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="hpcllm TOML config (default: $HPCLLM_CONFIG, else built-in defaults).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch compute threads. Default: worker.cpu_threads, else torch's own (every core).")
@click.option("--tensor-parallel", is_flag=True,
              help="Run as one rank of a tensor-parallel instance started by mpirun / srun --mpi=pmix: the MPI world "
                   "size is the degree; rank 0 serves HTTP, the other ranks follow its steps (docs/tensor-parallel.md).")
def worker(model_path: Path, model_name: str | None, host: str | None, port: int, device: str | None,
           max_model_len: int | None, url_file: Path | None, config_path: Path | None, threads: int | None,
           tensor_parallel: bool) -> None:
    """Serve one model: internal NDJSON generate API, /health, /ready, /metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if tensor_parallel:
        from hpcllm.tp.worker import run_tensor_parallel_worker

        run_tensor_parallel_worker(load_config(config_path), model_path, model_name, host, port, device,
                                   max_model_len, url_file, threads)
        return
    run_worker(load_config(config_path), model_path, model_name, host, port, device, max_model_len, url_file,
               threads)
