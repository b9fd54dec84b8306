"""Which node this process runs on, as Slurm names it, and the node-pattern expansion of node paths (%n, %j).

Used by the node agent and by processes it starts (a tensor-parallel rank finding its node's slice copy), so it
lives apart from both.
"""

from __future__ import annotations

import os
import socket


def node_name() -> str:
    """The Slurm node name where Slurm set it (it is what Slurm and the controller call the node), else hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def expand_node_pattern(value: str, node: str, job_id: str | None) -> str:
    """%n -> node name, %j -> Slurm job id (or 'nojob'), then $VARIABLES from the environment."""
    return os.path.expandvars(value.replace("%n", node).replace("%j", job_id or "nojob"))
