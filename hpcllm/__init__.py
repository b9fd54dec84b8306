"""hpcllm: Slurm-integrated LLM serving for HPC clusters.

Sub-packages, one per concept:
  checkpoint  loading-optimized checkpoint format and converter
  store       tiered store (DRAM / node-local disk / shared FS) and the pipelined loader
  node        per-node agent that runs inside a Slurm job (caches, bandwidth probes, workers)
  worker      inference worker (engine, KV cache, migration)
  controller  registry, placement, autoscaling; state in SQLite
  slurm       Slurm backends behind one interface (CLI, slurmrestd, pyslurm)
  mpi         mpi4py helpers (broadcast warming)
  gateway     OpenAI-compatible HTTP gateway (Flask on gunicorn)
  devmodels   small real test models built offline
  cli         the `hpcllm` command
"""

from hpcllm.version import __version__

__all__ = ["__version__", "load_model"]


def load_model(*args, **kwargs):
    """Load a converted checkpoint into a ready transformers model; see hpcllm.store.loader.load_model."""
    from hpcllm.store.loader import load_model as _load_model

    return _load_model(*args, **kwargs)
