"""Which GPUs this node agent may hand to workers.

Order of evidence: NVML (nvidia-ml-py, optional) where the driver is present; else what Slurm gave the job
(CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS, SLURM_GPUS_ON_NODE: the dev cluster's fake GPUs live only there); else none.
Inside a Slurm job CUDA_VISIBLE_DEVICES narrows NVML's count to the job's GPUs.

Workers get GPUs by *agent index* 0..n-1; `visible_device_names()[i]` is what goes into the worker's
CUDA_VISIBLE_DEVICES, so a worker only sees the GPUs of its instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

NO_DEVICES = {"", "none", "nodevfiles", "-1"}


@dataclass(frozen=True)
class GpuInventory:
    names: tuple[str, ...]  # what CUDA_VISIBLE_DEVICES entries select each GPU (index = agent GPU id)
    source: str  # "nvml", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE" or "none"

    @property
    def count(self) -> int:
        return len(self.names)

    def visible_devices(self, gpu_ids: list[int]) -> str:
        return ",".join(self.names[i] for i in gpu_ids)


def _env_list(name: str, env: dict[str, str]) -> list[str] | None:
    value = env.get(name)
    if value is None or value.strip().lower() in NO_DEVICES:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _nvml_count() -> int | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver / library on this node
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect_gpus(env: dict[str, str] | None = None, use_nvml: bool = True) -> GpuInventory:
    env = dict(os.environ) if env is None else env
    visible = _env_list("CUDA_VISIBLE_DEVICES", env)
    nvml = _nvml_count() if use_nvml else None
    if nvml is not None:
        names = visible[:nvml] if visible is not None else [str(i) for i in range(nvml)]
        return GpuInventory(tuple(names), "nvml")
    if visible is not None:
        return GpuInventory(tuple(visible), "CUDA_VISIBLE_DEVICES")
    job_gpus = _env_list("SLURM_JOB_GPUS", env)
    if job_gpus is not None:
        return GpuInventory(tuple(job_gpus), "SLURM_JOB_GPUS")
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return GpuInventory(tuple(str(i) for i in range(int(on_node))), "SLURM_GPUS_ON_NODE")
    return GpuInventory((), "none")
