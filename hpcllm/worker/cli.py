"""`run_worker`: serve one converted checkpoint on the worker's internal HTTP API (the body of `hpcllm worker
--model PATH`, whose click command is hpcllm/cli/worker.py).

The node agent starts the command (or calls `run_worker` in a warm process with imports done). The shared secret comes
from the config's cluster.shared_secret or the HPCLLM_SHARED_SECRET environment variable, never from the command
line, where other users of the node could read it with ps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import stat
import threading
import time
from pathlib import Path

import click

from hpcllm.config import Config
from hpcllm.errors import ConfigError
from hpcllm.procs import descendants

SECRET_ENV = "HPCLLM_SHARED_SECRET"
# Set ("1") by the node agent that starts the worker with a pipe on its stdin that it never writes to nor closes
# (a spare's, once it wrote the assignment): the pipe's end means the agent is gone (killed with -9, by the OOM
# killer), and the worker stops rather than hold its GPUs, memory and port for no agent (docs/node-agent.md).
AGENT_STDIN_ENV = "HPCLLM_AGENT_STDIN"

log = logging.getLogger(__name__)


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
    loader=None,
    stop_signals: tuple[int, ...] | None = None,
    started_model_process=None,
    lora_adapters: dict[str, str] | None = None,
) -> None:
    """Serve model_path until SIGTERM. Imports torch/transformers here, so callers can pre-import to warm up.

    `loader` (returns a ModelForServing) replaces the tiered single-device load (tensor parallelism's lead).
    `started_model_process`: a ModelProcess a spare worker started while it waited; used when this worker runs its
    forward in a model process ([worker] model_process), else stopped. lora_adapters: name -> PEFT folder
    (`--lora-module`), served on the base model (hpcllm.worker.lora; vLLM's LoRA with engine "vllm")."""
    if not model_path.exists():
        raise ConfigError(f"model checkpoint {model_path} does not exist; pass the converted checkpoint folder")
    if url_file is not None and not os.access(url_file.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--url-file {url_file}: its folder {url_file.parent} does not exist or is not writable")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        # Before torch's import and the listening server: the agent gets the reason in a second, not after a load.
        from hpcllm.worker.vllm_launch import vllm_missing

        raise vllm_missing("No module named 'vllm'")
    worker = config.worker
    device = device or worker.device
    _check_cuda_graphs(worker, device, engine)
    # Before this process's own imports: the model process imports torch and transformers beside them.
    model_process = _model_process(worker, device, engine, tensor_parallel=loader is not None,
                                   started=started_model_process)
    import torch

    from hpcllm.worker.server import WorkerService, load_with_hpcllm, serve

    threads = threads or worker.cpu_threads
    if threads:  # set here, not via OMP_NUM_THREADS: a spare worker's OpenMP runtime started before its assignment
        torch.set_num_threads(threads)
    model_process_threads = _leave_the_threads_to(model_process)
    service = WorkerService(
        model_name or model_path.name,
        secret=os.environ.get(SECRET_ENV) or config.cluster.shared_secret,
        keepalive_seconds=worker.keepalive_seconds,
        freeze_heap=True,
        max_model_len=max_model_len,
        max_running_requests=worker.max_running_requests,
        max_waiting_requests=worker.max_waiting_requests,
        prefill_chunk_tokens=worker.prefill_chunk_tokens_for(device),
        kv_cache_tokens=worker.kv_cache_tokens or None,
        kv_block_size=worker.kv_block_size,
        batching=worker.batching,
        prefix_caching=worker.prefix_caching,
        model_process=model_process,
        async_scheduling=worker.async_scheduling,
        cuda_graphs=worker.cuda_graphs,
        speculative_ngram_tokens=worker.speculative_ngram_tokens,
        step_timeout=worker.step_timeout_seconds,  # a longer step is hung (EngineBase._watch_steps)
        lora_adapters=lora_adapters or {},
        **({"model_process_threads": model_process_threads} if model_process_threads else {}),
    )
    if engine == "vllm":
        loader = lambda: load_with_vllm_engine(service, worker, model_path, device, max_model_len,  # noqa: E731
                                               lora_adapters or {})
    elif loader is None:
        # weights bound for the model process go straight into shared memory: its pickling then copies nothing
        shared_memory = bool(model_process)
        loader = lambda: load_with_hpcllm(model_path, device, cache_into, shared_memory)  # noqa: E731
    if os.environ.pop(AGENT_STDIN_ENV, None) == "1":
        stop_when_the_agent_is_gone((stop_signals or (signal.SIGTERM,))[0],
                                    config.node.worker_stop_timeout_seconds)
    serve(
        service,
        loader=loader,
        host=host or worker.listen_host,
        port=port,
        url_file=url_file,
        http=config.internal_http,
        on_listening=lambda url: click.echo(f"hpcllm worker for {service.model_name} listening on {url}", err=True),
        **({"stop_signals": stop_signals} if stop_signals else {}),
    )


def stop_when_the_agent_is_gone(stop_signal: int, kill_after: float) -> None:
    """Watch stdin (the node agent's pipe, AGENT_STDIN_ENV; not watched, with a warning, if it is no pipe) on a
    thread: at its end, the agent is gone, and this
    process sends itself its stop signal (the stop the agent would give it: in-flight requests aborted, a
    tensor-parallel lead ends its followers), then SIGKILLs every process under it and itself after kill_after
    seconds (node.worker_stop_timeout_seconds, the agent's own grace) if a hung engine keeps it from ending."""
    try:
        piped = stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:  # no stdin at all
        piped = False
    if not piped:
        # A launcher that does not forward stdin (/dev/null, a terminal): its end would be no news of the agent.
        log.warning("stdin is not the node agent's pipe: this worker will not stop when its agent is gone")
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError as exc:  # no stdin to watch: the worker serves on, as it did before it watched
            log.warning("cannot watch stdin for the node agent's end: %s", exc)
            return
        log.warning("stdin closed: the node agent that started this worker is gone; stopping")
        os.kill(os.getpid(), stop_signal)
        time.sleep(kill_after)  # the process normally ends before: this thread ends with it
        log.error("the worker did not stop within %.0f s of its agent's end: SIGKILL", kill_after)
        # Its model process / vLLM engine core first: an orphan would keep its GPU and host memory.
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):  # ended since the listing
                os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="hpcllm-agent-watch", daemon=True).start()


def _check_cuda_graphs(worker, device: str, engine: str) -> None:
    """[worker] cuda_graphs is for hpcllm's engine on a GPU, forward in the worker process: say so before loading."""
    if not worker.cuda_graphs or engine != "hpcllm":
        return
    model_process = worker.model_process_for(device, engine)
    if not device.startswith("cuda") or model_process:
        raise ConfigError(f"[worker] cuda_graphs needs a GPU worker whose forward runs in the worker process; this one "
                          f"has device {device!r}{' and a model process' if model_process else ''}: set cuda_graphs "
                          f"false, or device cuda with model_process false")


def _leave_the_threads_to(model_process) -> int | None:
    """With a model process, its torch gets this worker's compute threads and the worker keeps one: the worker's own
    torch work is sampling over a step's logits, and a multi-threaded OpenMP pool here spins after every such op on
    the cores the model process computes on (measured: docs/worker.md, "The model process"). Returns the model
    process's threads (None without one)."""
    import torch

    if not model_process:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _model_process(worker, device: str, engine: str, tensor_parallel: bool, started):
    """The engine's model_process option ([worker] model_process resolved for this worker): the ModelProcess a spare
    started, else one started now; False without one."""
    if tensor_parallel:  # the tensor-parallel engine refuses an explicit true, saying why
        return worker.model_process is True
    wanted = worker.model_process_for(device, engine)
    if started is not None and (not wanted or not started.process.is_alive()):  # a dead one: start another
        started.close()
        started = None
    if wanted and started is None:
        from hpcllm.worker.model_process import ModelProcess

        started = ModelProcess()
    return started or False


def load_with_vllm_engine(service, worker, model_path: Path, device: str, max_model_len: int | None,
                          lora_adapters: dict[str, str] | None = None):
    """The vLLM engine (hpcllm.worker.vllm_engine) with the worker's settings, reporting into its metrics."""
    from hpcllm.worker.vllm_engine import VllmSettings, load_with_vllm

    settings = VllmSettings(kv_cache_gb=worker.vllm_kv_cache_gb, enforce_eager=worker.vllm_enforce_eager,
                            max_num_seqs=worker.vllm_max_num_seqs)
    return load_with_vllm(model_path, service.model_name, device, max_model_len, settings, metrics=service.metrics,
                          max_running_requests=worker.max_running_requests,
                          max_waiting_requests=worker.max_waiting_requests,
                          step_timeout=worker.step_timeout_seconds,  # as hpcllm's engine (EngineBase._watch_steps)
                          lora_adapters=lora_adapters or {})
