"""`hpcllm worker --tensor-parallel`: one model instance over the ranks of an MPI launch.

    mpirun -n 2 hpcllm worker --model CKPT --tensor-parallel --url-file URL     (or srun --mpi=pmix ... in Slurm)

Rank, size and the rendezvous come from MPI (mpi4py), never from hand-passed environment. Every rank loads its
shard (hpcllm.tp.mpiload); rank 0 is an ordinary worker (HTTP API, scheduler, sampling, metrics, migration) whose
engine broadcasts each forward as a Step; the other ranks run `follow` until the lead stops. A load failure on
any rank ends every rank with the failed rank named (the lead's server exits with it too).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Callable

from hpcllm.config import Config
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import catchable_signal, ignore_drain_signal

log = logging.getLogger(__name__)


SliceCopyFinder = Callable[[int, int], "Path | None"]  # (degree, rank) -> this node's slice copy of that rank


def run_tensor_parallel_worker(config: Config, model_path: Path, model_name: str | None, host: str | None, port: int,
                               device: str | None, max_model_len: int | None, url_file: Path | None,
                               threads: int | None, stop_signal: str = "TERM",
                               slice_copy_for: SliceCopyFinder | None = None, node: str | None = None,
                               node_copy: Path | None = None) -> None:
    """stop_signal: what ends the instance (the lead's shutdown). Not TERM under an srun step: Slurm may send
    SIGTERM to every task of every step when it preempts the job, which must not end the instance before the node
    agent has migrated its streams, so then every rank ignores SIGTERM and the agent stops it with this signal (srun
    forwards it to every rank; the followers ignore it and end with the lead's stop step).
    `slice_copy_for`: where this rank's node keeps its slices (hpcllm cache warm --tensor-parallel); the rank reads
    them from there and the rest from `model_path`, or from `node_copy`, this rank's node's whole copy of the
    checkpoint, when it has one (ranks on other nodes than the agent's are given the origin's path). `node`: this
    rank's node as Slurm names it (for the per-rank load report)."""
    from hpcllm.mpi import comm_world

    stop = catchable_signal(stop_signal, "--stop-signal")
    comm = comm_world()
    slice_copy = slice_copy_for(comm.Get_size(), comm.Get_rank()) if slice_copy_for else None
    ignore = ignore_drain_signal(config)
    if ignore is not None:  # as the agent's single workers do: mpirun gives its ranks the default action
        ignore()
    if stop != signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Every rank learns which ranks lack the folder (a node without the shared filesystem): one rank raising alone
    # would leave the others waiting in the load's first broadcast forever.
    missing = [f"rank {rank} ({path})" for rank, (path, exists)
               in enumerate(comm.allgather((str(model_path), model_path.exists()))) if not exists]
    if missing:
        raise ConfigError(f"rank {comm.Get_rank()}: model checkpoint does not exist on {', '.join(missing)}; pass "
                          f"the converted checkpoint folder, reachable from every rank's node")
    device = device or config.worker.device
    origin, model_path = model_path, node_copy or model_path
    if comm.Get_rank() == 0:
        from hpcllm.worker.cli import run_worker

        leads: list = []  # the LeadRunner, once the load made it: it knows whether the followers were stopped
        failure: BaseException | None = None
        try:
            run_worker(config, model_path, model_name, host, port, device, max_model_len, url_file, threads,
                       loader=lambda: _load_lead(model_path, comm, device, slice_copy, node, origin, leads),
                       stop_signals=(stop, signal.SIGINT))
        except BaseException as exc:
            failure = exc
            raise
        finally:  # also a normal return: a stop signal during the load ends the server before any engine exists
            _end_unstopped_followers(comm, leads, failure)
    else:
        signal.signal(stop, signal.SIG_IGN)
        _run_follower(model_path, comm, device, threads or config.worker.cpu_threads, slice_copy, node)


def _end_unstopped_followers(comm, leads: list, exc: BaseException | None) -> None:
    """The lead ended without its stop step - it failed (a [worker] option its engine refuses, its server's port,
    ...) or was stopped during the load, before its engine existed (exc None) - while the followers wait in the
    load's collectives or for the next step: exiting alone would leave the MPI job running forever, so it prints
    its error (the instance's error line) and aborts every rank. Not after its stop step, nor when the load failed
    on every rank already (each raised TensorParallelLoadError)."""
    from hpcllm.tp.mpiload import TensorParallelLoadError

    if (leads and leads[0].stopped) or isinstance(exc, TensorParallelLoadError):
        return
    reason = (exc or type(exc).__name__) if exc is not None else "the lead stopped before the instance was loaded"
    print(f"error: {reason}; aborting every rank of the tensor-parallel instance", file=sys.stderr, flush=True)
    comm.Abort(1)


def collective_and_device(comm, device: str):
    """GPU ranks: NCCL through torch.distributed, one GPU per node-local rank; CPU ranks: mpi4py (None here)."""
    if device.startswith("cuda"):
        import torch

        from hpcllm.tp.model import init_torch_distributed

        collective = init_torch_distributed(comm, "nccl")
        return collective, f"cuda:{torch.cuda.current_device()}"
    return None, "cpu"


def rank_loads(all_stats: list[dict], origin: Path) -> list[dict]:
    """What /ready reports of each rank's load: where it ran, whether it read its node's slice copy or its node's
    whole copy instead of the path the instance was given (`origin`), bytes, time."""
    return [{"rank": s["rank"], "node": s["node"], "slice_copy": bool(s["slice_copy"]),
             "node_copy": s["path"] != str(origin), "bytes_read": s["bytes_read"], "cache_bytes": s["cache_bytes"],
             "seconds": s["seconds"]} for s in all_stats]


def _load_lead(model_path: Path, comm, device: str, slice_copy: Path | None, node: str | None, origin: Path,
               leads: list):
    from hpcllm.store.tiers import detect_tier
    from hpcllm.tp.mpiload import load_shard
    from hpcllm.tp.serve import LeadRunner, ShardRunner, StepChannel, tensor_parallel_engine_class
    from hpcllm.worker.server import ModelForServing

    collective, device = collective_and_device(comm, device)
    loaded = load_shard(model_path, comm, device=device, collective=collective, slice_copy=slice_copy, node=node)
    for stats in loaded.all_stats or []:
        log.info("tensor-parallel rank %s on %s read %d bytes in %s reads (%d bytes from its slice copy %s), "
                 "verified %d strips, ready in %.2f s", stats["rank"], stats["node"], stats["bytes_read"],
                 stats["reads"], stats["cache_bytes"], stats["slice_copy"] or "-", stats["strips_verified"],
                 stats["seconds"])
    lead = LeadRunner(StepChannel(comm), ShardRunner(loaded.model))
    leads.append(lead)
    if loaded.tokenizer is None:
        lead.stop()
        raise ConfigError(f"checkpoint {model_path} has no tokenizer files; convert it from a folder that has them")
    engine_class = tensor_parallel_engine_class()

    def make_engine(model, tokenizer, **options):
        return engine_class(lead, tokenizer, **options)

    return ModelForServing(loaded.model, loaded.tokenizer, tier=detect_tier(model_path),
                           load_seconds=loaded.stats["seconds"], owner=loaded, engine_factory=make_engine,
                           rank_loads=rank_loads(loaded.all_stats or [], origin))


def _run_follower(model_path: Path, comm, device: str, threads: int, slice_copy: Path | None,
                  node: str | None) -> None:
    import torch

    from hpcllm.tp.mpiload import load_shard
    from hpcllm.tp.serve import ShardRunner, StepChannel, follow

    if threads:
        torch.set_num_threads(threads)
    # The lead's shutdown (SIGTERM to every rank under srun) ends the followers with a stop step; a follower that
    # died first would leave the lead's last broadcast without a peer.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    collective, device = collective_and_device(comm, device)
    loaded = load_shard(model_path, comm, device=device, collective=collective, tokenizer=False,
                        slice_copy=slice_copy, node=node)
    steps = follow(StepChannel(comm), ShardRunner(loaded.model))
    log.info("rank %d: the lead stopped after %d steps", comm.Get_rank(), steps)
