"""A spare worker: a process that has imported torch, transformers and the worker's server before any model is asked
for, then waits on stdin for the one assignment that makes it `hpcllm worker --model ...`.

Importing the modeling stack costs a fresh worker ~2.5-4 s on these machines (docs/loader.md, `phases["config"]`),
more than loading a small checkpoint from the DRAM tier or NVMe. The node agent keeps `node.spare_workers` of these
ready (hpcllm.node.workers) so a cold start pays only the load itself.

    python -m hpcllm.worker.spare          # then one JSON line (SpareAssignment) on stdin

End of stdin without an assignment (the agent retired the spare, or died) ends the process with status 0.

GPUs: the spare starts with CUDA_VISIBLE_DEVICES="" and PYTORCH_NVML_BASED_CUDA_CHECK=1, so nothing it imports can
initialise CUDA or pin the device list; the assignment sets the instance's CUDA_VISIBLE_DEVICES before the first
CUDA call, which torch documents as honoured until CUDA is initialised. Should CUDA have been initialised anyway,
the assignment fails with a clear error instead of serving on the wrong GPUs.

Host memory: with $HPCLLM_HOST_POOL_BYTES (the agent sets it from node.spare_host_pool_gb and the checkpoints it
caches) the spare reserves that much page-aligned memory (huge pages) and faults it in, in a thread, while it
waits; its CPU load then reads O_DIRECT (or buffered, where the node's probe measured that faster) straight into it
(hpcllm.store.memory.HostBufferPool.reserve_bytes, docs/loader.md). An assignment that arrives before the memory is
faulted in stops the reservation instead of waiting for it (huge pages fault slowly here: 2 GB took 3-16 s) and the
load uses fresh memory. A GPU assignment gives the memory back.

Model process: with $HPCLLM_SPARE_MODEL_PROCESS=1 (the agent sets it where CPU workers run their forward in a model
process, [worker] model_process) the spare also starts that child while it waits, so its imports are done when the
assignment comes (docs/worker.md "The model process"); an assignment that does not use it (a GPU, vLLM, or
model_process = false in the instance's config) stops it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from pydantic import BaseModel

from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.procs import freeze_startup_heap

# Imported before the assignment arrives: what a fresh worker would pay for on its first load.
PREIMPORTS = (
    "torch",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",  # pulls in the shared modeling stack (torch._dynamo, masks, ...)
    "hpcllm.store.loader",
    "hpcllm.worker.server",
)


MODEL_PROCESS_ENV = "HPCLLM_SPARE_MODEL_PROCESS"
MODEL_PROCESS_READY = "spare worker: model process ready (imports done)"


class SpareAssignment(BaseModel):
    """What the node agent writes to a spare's stdin: the `hpcllm worker` options plus the instance's environment."""

    model_path: str
    model_name: str
    device: str
    url_file: str
    config_path: str | None = None
    max_model_len: int | None = None
    threads: int | None = None
    cache_into: str | None = None  # `hpcllm worker --cache-into`
    lora_adapters: dict[str, str] = {}  # `hpcllm worker --lora-module NAME=PATH`
    env: dict[str, str] = {}


def preimport() -> None:
    import importlib

    for module in PREIMPORTS:
        importlib.import_module(module)


def assume(assignment: SpareAssignment, model_process=None) -> None:
    """Become the assigned worker: the instance's environment first (GPUs), then serve until SIGTERM.
    model_process: the ModelProcess this spare started while it waited (run_worker uses or stops it)."""
    os.environ.update(assignment.env)
    if assignment.device.startswith("cuda"):
        import torch

        from hpcllm.store.memory import default_pool

        default_pool().trim()  # a GPU load stages through pinned slots: the reserved host memory is not needed

        if torch.cuda.is_initialized():
            raise ConfigError("this spare worker initialised CUDA before its assignment, so it cannot take GPUs "
                              f"{assignment.env.get('CUDA_VISIBLE_DEVICES')!r}; set node.spare_workers = 0")
    from hpcllm.config import load_config
    from hpcllm.worker.cli import run_worker

    config = load_config(Path(assignment.config_path) if assignment.config_path else None)
    run_worker(config, Path(assignment.model_path), assignment.model_name, port=0, device=assignment.device,
               max_model_len=assignment.max_model_len, url_file=Path(assignment.url_file),
               threads=assignment.threads,
               cache_into=Path(assignment.cache_into) if assignment.cache_into else None,
               started_model_process=model_process, lora_adapters=assignment.lora_adapters)


class BackgroundReservation:
    """Faults the host pool ($HPCLLM_HOST_POOL_BYTES) in on a thread while the spare waits for its assignment."""

    def __init__(self):
        self.stop = threading.Event()
        self.reserved = 0
        self.thread = threading.Thread(target=self._reserve, name="hpcllm-reserve", daemon=True)

    def _reserve(self) -> None:
        from hpcllm.store.memory import reserve_from_environment

        # A spare with a model process loads into shared memory (run_worker): its arena is shared memory too.
        self.reserved = reserve_from_environment(self.stop, shared=os.environ.get(MODEL_PROCESS_ENV) == "1")
        if self.reserved:
            print(f"spare worker: host pool {self.reserved / 1e9:.2f} GB faulted in", file=sys.stderr, flush=True)

    def start(self) -> "BackgroundReservation":
        self.thread.start()
        return self

    def finish(self) -> int:
        """Stop a reservation still in progress (within one step) and wait for the thread; bytes reserved."""
        self.stop.set()
        self.thread.join()
        return self.reserved


def main() -> int:
    from hpcllm.logs import setup_service_logging

    setup_service_logging()
    model_process = start_model_process()  # first: its imports run beside this process's own
    preimport()
    # The imports' heap leaves the collector's walks before the assignment: the worker's freeze once its engine is
    # built (WorkerService.attach) then walks only what the load made, not ~385k objects (0.1-0.2 s of start time).
    freeze_startup_heap()
    reservation = BackgroundReservation().start()
    print("spare worker ready (imports done; host pool reserving in the background"
          f"{'; model process starting' if model_process else ''})", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    reserved = reservation.finish()
    if not line.strip():
        if model_process is not None:
            model_process.close()
        return 0  # retired before it was needed
    print(f"spare worker assigned (host pool {reserved / 1e9:.2f} GB faulted in; 0: none, or not finished in "
          f"time - the load uses fresh memory)", file=sys.stderr, flush=True)
    try:
        assume(SpareAssignment.model_validate_json(line), model_process)
    except HpcllmError as exc:  # the same contract as `hpcllm worker`: one error line, the error's exit status
        if model_process is not None:
            model_process.close()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


def start_model_process():
    """The model process, started now when the agent asked for it ($HPCLLM_SPARE_MODEL_PROCESS=1), else None; a
    thread says in the log when its imports are done (MODEL_PROCESS_READY)."""
    if os.environ.get(MODEL_PROCESS_ENV) != "1":
        return None
    from hpcllm.worker.model_process import ModelProcess

    model_process = ModelProcess()

    def report() -> None:
        if model_process.wait_imported():
            print(MODEL_PROCESS_READY, file=sys.stderr, flush=True)

    threading.Thread(target=report, name="hpcllm-model-process-imports", daemon=True).start()
    return model_process


if __name__ == "__main__":
    sys.exit(main())
