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
    engine: str = "hpcllm",
    cache_into: Path | None = None,
) -> None:
    """Serve model_path until SIGTERM. Imports torch/transformers here, so callers can pre-import to warm up."""
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
        kv_cache_tokens=worker.kv_cache_tokens or None,
        kv_block_size=worker.kv_block_size,
        batching=worker.batching,
        prefix_caching=worker.prefix_caching,
    )
    if engine == "vllm":
        loader = lambda: load_with_vllm_engine(service, worker, model_path, device, max_model_len)  # noqa: E731
    else:
        loader = lambda: load_with_hpcllm(model_path, device, cache_into)  # noqa: E731
    serve(
        service,
        loader=loader,
        host=host or worker.listen_host,
        port=port,
        url_file=url_file,
        on_listening=lambda url: click.echo(f"hpcllm worker for {service.model_name} listening on {url}", err=True),
    )


def load_with_vllm_engine(service, worker, model_path: Path, device: str, max_model_len: int | None):
    """The vLLM engine (hpcllm.worker.vllm_engine) with the worker's settings, reporting into its metrics."""
    from hpcllm.worker.vllm_engine import VllmSettings, load_with_vllm

    settings = VllmSettings(kv_cache_gb=worker.vllm_kv_cache_gb, enforce_eager=worker.vllm_enforce_eager,
                            max_num_seqs=worker.vllm_max_num_seqs)
    return load_with_vllm(model_path, service.model_name, device, max_model_len, settings, metrics=service.metrics,
                          max_running_requests=worker.max_running_requests,
                          max_waiting_requests=worker.max_waiting_requests)


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
@click.option("--engine", type=click.Choice(["hpcllm", "vllm"]), default="hpcllm", show_default=True,
              help="hpcllm's engine, or vLLM (run this with the interpreter of `make vllm-venv`).")
@click.option("--cache-into", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Empty folder (given by the node agent): also write the checkpoint bytes the load reads there, "
                   "for the node's cache (cache on load). hpcllm engine only.")
def worker(model_path: Path, model_name: str | None, host: str | None, port: int, device: str | None,
           max_model_len: int | None, url_file: Path | None, config_path: Path | None, threads: int | None,
           engine: str, cache_into: Path | None) -> None:
    """Serve one model: internal NDJSON generate API, /health, /ready, /metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_worker(load_config(config_path), model_path, model_name, host, port, device, max_model_len, url_file,
               threads, engine, cache_into)
