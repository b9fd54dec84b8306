"""Slurm behind one interface: CLI (default), slurmrestd and pyslurm backends, a batched status watcher, and
batch scripts rendered from slurm/templates/. See docs/slurm-backends.md."""

from hpcllm.slurm.base import (
    JobSpec,
    JobState,
    JobStatus,
    NodeInfo,
    PartitionInfo,
    SlurmBackend,
    make_job_spec,
)
from hpcllm.slurm.errors import SlurmBackendUnsupported, SlurmError, SlurmUnavailable
from hpcllm.slurm.factory import get_backend
from hpcllm.slurm.watcher import Job, StatusWatcher

__all__ = [
    "Job",
    "JobSpec",
    "JobState",
    "JobStatus",
    "NodeInfo",
    "PartitionInfo",
    "SlurmBackend",
    "SlurmBackendUnsupported",
    "SlurmError",
    "SlurmUnavailable",
    "StatusWatcher",
    "get_backend",
    "make_job_spec",
]
