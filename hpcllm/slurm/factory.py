"""get_backend: the Slurm backend a config names. A module of its own: it imports every backend, and each
backend imports base, so the factory cannot live in base without an import cycle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcllm.errors import ConfigError
from hpcllm.slurm.base import SlurmBackend

if TYPE_CHECKING:
    from hpcllm.config import SlurmConfig


def get_backend(config: SlurmConfig) -> SlurmBackend:
    """The backend `config.backend` names: "cli" (default), "rest" (slurmrestd) or "pyslurm"."""
    if config.backend == "cli":
        from hpcllm.slurm.cli_backend import CliBackend

        return CliBackend(config)
    if config.backend == "rest":
        from hpcllm.slurm.rest_backend import RestBackend

        return RestBackend(config)
    if config.backend == "pyslurm":
        from hpcllm.slurm.pyslurm_backend import PyslurmBackend

        return PyslurmBackend(config)
    raise ConfigError(f'[slurm] backend = "{config.backend}" is not one of "cli", "rest", "pyslurm"')
