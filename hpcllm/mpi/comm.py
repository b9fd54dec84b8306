"""Guarded access to MPI through mpi4py."""

from __future__ import annotations

from typing import Any

from hpcllm.errors import HpcllmError


class MpiUnavailableError(HpcllmError):
    """mpi4py (or the MPI library it links) cannot be loaded."""


def comm_world() -> Any:
    """Returns mpi4py's MPI.COMM_WORLD, initialising MPI on first use.

    Raises MpiUnavailableError, naming the fix, when mpi4py or its MPI library is missing.
    """
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise MpiUnavailableError(
            f"MPI is unavailable: {error}. Install mpi4py (pip install -e '.[mpi]') and OpenMPI (make host)"
        ) from error
    return MPI.COMM_WORLD
