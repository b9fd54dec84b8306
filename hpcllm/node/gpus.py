"""Which GPUs this node agent may hand to workers.

What Slurm gave the job decides, NVML (nvidia-ml-py, optional) only confirms and counts:
- CUDA_VISIBLE_DEVICES set: exactly those (capped to NVML's count where NVML exists, unless they are MIG slices,
  which NVML does not count). Set but empty, "NoDevFiles"
  or starting with "-1": no GPU (CUDA itself then sees none; NVML would still list the whole node's).
- else SLURM_JOB_GPUS, else SLURM_GPUS_ON_NODE (the dev cluster's fake GPUs live only in these variables);
- else, inside a Slurm job (SLURM_JOB_ID set): no GPU. NVML ignores CUDA_VISIBLE_DEVICES and cgroups do not
  always hide devices, so NVML would report GPUs that belong to other jobs;
- else (outside Slurm) every GPU NVML counts; without NVML, none.

Workers get GPUs by *agent index* 0..n-1; `names[i]` is what goes into the worker's CUDA_VISIBLE_DEVICES, so a
worker only sees the GPUs of its instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

NO_DEVICES = {"", "none", "nodevfiles"}
# A MIG slice's CUDA_VISIBLE_DEVICES entry (MIG-<uuid>, or MIG-GPU-<uuid>/gi/ci): NVML counts physical GPUs, not their
# slices, so its count is no cap on a list of slices.
MIG_PREFIX = "MIG-"


@dataclass(frozen=True)
class GpuInventory:
    names: tuple[str, ...]  # what CUDA_VISIBLE_DEVICES entries select each GPU (index = agent GPU id)
    source: str  # "nvml", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "slurm-job" or "none"

    @property
    def count(self) -> int:
        return len(self.names)

    def visible_devices(self, gpu_ids: list[int]) -> str:
        return ",".join(self.names[i] for i in gpu_ids)


def _env_list(name: str, env: dict[str, str]) -> list[str] | None:
    """The comma-separated list in env[name]; None when unset, [] when it says "no device"."""
    value = env.get(name)
    if value is None:
        return None
    if value.strip().lower() in NO_DEVICES:
        return []
    names = []
    for part in (p.strip() for p in value.split(",")):
        if part.startswith("-"):  # CUDA stops enumerating at the first invalid index ("-1" hides the rest)
            break
        if part:
            names.append(part)
    return names


def _nvml_count() -> int | None:
    """GPUs the driver knows on this node (all of them: NVML ignores CUDA_VISIBLE_DEVICES); None without NVML."""
    try:
        import pynvml  # the nvidia-ml-py package (the `gpu` extra); the old `pynvml` package wraps the same
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):  # no driver / libnvidia-ml on this node
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def detect_gpus(env: dict[str, str] | None = None, use_nvml: bool = True) -> GpuInventory:
    env = dict(os.environ) if env is None else env
    nvml = _nvml_count() if use_nvml else None
    visible = _env_list("CUDA_VISIBLE_DEVICES", env)
    if visible is not None:
        if not visible:
            return GpuInventory((), "none")  # hidden on purpose, whatever NVML lists
        if nvml is not None and not any(name.startswith(MIG_PREFIX) for name in visible):
            return GpuInventory(tuple(visible[:nvml]), "nvml")
        return GpuInventory(tuple(visible), "CUDA_VISIBLE_DEVICES")
    job_gpus = _env_list("SLURM_JOB_GPUS", env)
    if job_gpus:
        return GpuInventory(tuple(job_gpus[:nvml] if nvml is not None else job_gpus), "SLURM_JOB_GPUS")
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        count = int(on_node) if nvml is None else min(int(on_node), nvml)
        return GpuInventory(tuple(str(i) for i in range(count)), "SLURM_GPUS_ON_NODE")
    if env.get("SLURM_JOB_ID"):
        return GpuInventory((), "slurm-job")  # the job has no GPU; the node's GPUs are other jobs'
    if nvml:
        return GpuInventory(tuple(str(i) for i in range(nvml)), "nvml")
    return GpuInventory((), "none")
