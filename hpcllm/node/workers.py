"""Worker processes of one node agent: start (`hpcllm worker`), watch (loading -> ready | failed), stop.

Each instance is one child process serving one model copy. It loads from the best local copy the cache manager
knows (dram > nvme > the shared-FS origin); that copy is acquired (never evicted) while the instance lives and
released when the process is gone. A watcher thread per instance reads the worker's URL file, polls its /ready
(which reports load_tier, load_seconds, running_requests) and notices a crash (state failed, with the last lines
of the worker's log as the error). Stop: SIGTERM (the worker aborts in-flight requests and exits), SIGKILL after
node.worker_stop_timeout_seconds.

Live migration (docs/node-agent.md): `migrate_out` asks a worker to move all its running requests to a worker of
the same model elsewhere (the worker's POST /v1/internal/migrate, token-based rounds while it keeps decoding); the
agent then stops it. A request the worker could not move stays on it and is aborted by the stop: the gateway
resumes it from its tokens, so a failed migration never loses a request.

A tensor-parallel instance (`tensor_parallel = N`) is one `mpirun -n N ... hpcllm worker --tensor-parallel` on this
node: rank 0 writes the URL file and serves, the ranks exit together (a failed rank aborts the job; the stop signal,
mpirun_stop_signal, which mpirun forwards, reaches the lead, whose stop step ends the followers), and a SIGKILL goes
to mpirun and every process under it (OpenMPI puts each rank in a process group of its own) so no rank outlives its
instance (docs/tensor-parallel.md, "Started by the node agent").
One whose ranks span nodes (`nodes` > 1, in an allocation made for it) is one `srun --mpi=pmix` step over the job's
nodes instead: its ranks ignore SIGTERM (Slurm may send it to every step when it preempts the job), the agent stops
it with SPANNING_STOP_SIGNAL (srun forwards it to every rank) and kills it with SIGTERM to srun (which SIGKILLs
every rank on every node).

Workers ignore the drain signal (SIGUSR1 by default): Slurm's `scancel --signal` reaches every process of the
step, and a drain is the agent's business (it stops its workers with SIGTERM when it is ready to).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import httpx

from hpcllm.config import Config
from hpcllm.controller.protocol import InstanceInfo
from hpcllm.credentials import TOKEN_ENV, TOKEN_FILE_ENV, MigrationTicket
from hpcllm.errors import HpcllmError
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.httpkit.client import error_of, internal_client, json_object
from hpcllm.node.gpus import MIG_PREFIX, GpuInventory
from hpcllm.node.protocol import AdapterFailure, LoraAdaptersApplied, StartInstance, first_instances_version
from hpcllm.procs import descendants, exited_within, proc_stat
from hpcllm.slurm.base import drain_signal, ignore_drain_signal
from hpcllm.store.memory import HOST_POOL_ENV
from hpcllm.store.tuning import TUNING_ENV, ReadTuning
from hpcllm.worker.cli import AGENT_STDIN_ENV, SECRET_ENV
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import MigrateRequest, MigrationFailure, MigrationResult, drain_answer_margin
from hpcllm.worker import vllm_launch
from hpcllm.worker.spare import MODEL_PROCESS_ENV, SpareAssignment
from hpcllm.checkpoint.context import ContextLengthError, source_max_model_len
from hpcllm.checkpoint.errors import CheckpointError, ChecksumMismatch

log = logging.getLogger(__name__)

LOCAL_TIERS = ("dram", "nvme")
NVME = "nvme"
TIER_ORDER = ("dram", "nvme", "sharedfs")  # fastest first: an instance's load tier is its ranks' last
SPARE_IMPORT_SECONDS = 10.0  # a fresh spare imports torch/transformers for ~2.5-4 s (docs/node-agent.md)
# A spare that dies within SPARE_IMPORT_SECONDS a second time in a row (a broken environment, memory too short for its
# host pool) is not replaced for this long, doubling with each further quick death up to SPARE_RETRY_MAX_SECONDS: each
# start would take the node's CPU and host memory again and keep the read sweep waiting.
SPARE_RETRY_SECONDS = 30.0
SPARE_RETRY_MAX_SECONDS = 900.0
FASTER_TIERS = {"sharedfs": ("dram", "nvme"), "nvme": ("dram",), "dram": ()}  # what a load from a tier can fill
# A worker exiting with these failed its load on the copy's bytes (ChecksumMismatch) or files (a file cut short or
# gone while it read: TruncatedFile, MissingFile, any CheckpointError): a cached copy it loaded is replaced, else
# every later start on the node would load it and fail the same way.
BAD_COPY_EXITS = (ChecksumMismatch.exit_code, CheckpointError.exit_code)


MPIRUN = "mpirun"
SRUN = "srun"
# What stops an instance whose ranks span nodes: srun forwards it to every rank (the lead shuts down, the followers
# ignore it and end with the lead's stop step). Not TERM: Slurm may send SIGTERM to every task of every step when it
# preempts the job (sites differ; it does when the grace period ends), before the agent has migrated the streams.
SPANNING_STOP_SIGNAL = signal.SIGUSR2
# After a SIGKILL: how long the processes it hit get to end before the agent logs that they do not (uninterruptible
# sleep in a hung GPU driver or filesystem, which nothing but the driver's recovery or a reboot ends).
KILL_WAIT_SECONDS = 10.0


def srun_launch(ranks: int, nodes: int, gpus_per_node: int) -> list[str]:
    """The launcher of a tensor-parallel instance whose ranks span `nodes` nodes of this agent's Slurm job: one
    step, ranks / nodes tasks on each node, rank, size and rendezvous from PMIx (mpi4py). Task 0 (the lead, which
    writes the URL file the agent reads) runs on the job's first node, the agent's. --overlap: the step may share
    the job's CPUs with a previous instance's step that is still ending. A rank that fails ends the step.
    --input=0: srun's stdin, the agent's pipe, goes to the lead alone, which stops the instance at its end (the
    agent died); the followers end with the lead's stop step, or with the step if the lead must kill itself."""
    command = [SRUN, "--mpi=pmix", f"--nodes={nodes}", f"--ntasks={ranks}", f"--ntasks-per-node={ranks // nodes}",
               "--overlap", "--kill-on-bad-exit=1", "--input=0", "--export=ALL", "--quiet"]
    return command + ([f"--gres=gpu:{gpus_per_node}"] if gpus_per_node else [])


def mpi_launch(ranks: int, cpu: bool) -> list[str]:
    """The launcher of a tensor-parallel instance's ranks on this node. mpirun rather than `srun --mpi=pmix`: the
    agent runs in its job's batch step, and Slurm's preemption sends SIGTERM to every srun step at once (the
    instance would die before the agent's drain migrates its requests); processes of the batch step only get what
    the agent sends them. `plm isolated` / `ras ^slurm`: the ranks start here, never through Slurm, even inside a
    multi-node allocation. CPU ranks sharing cores must not busy-wait in MPI calls (mpi_yield_when_idle)."""
    command = [MPIRUN, "-n", str(ranks), "--oversubscribe", "--bind-to", "none",
               "--mca", "plm", "isolated", "--mca", "ras", "^slurm"]
    return command + (["--mca", "mpi_yield_when_idle", "1"] if cpu else [])


# What the --version of MPICH's and Intel MPI's hydra (and MVAPICH, built on it) prints.
OTHER_MPI_MARKS = ("HYDRA", "MPICH", "Intel(R) MPI", "MVAPICH")


def not_open_mpi(mpirun: str) -> str | None:
    """What `mpirun --version` says when it names a launcher known not to be Open MPI's (OTHER_MPI_MARKS), else None:
    mpi_launch passes Open MPI's options (MPICH's and Intel MPI's hydra have no `--mca`) and only Open MPI's
    forwarding of mpirun_stop_signal to the ranks is known to stop them. Launchers built on Open MPI that print their
    own name (IBM Spectrum MPI) take its options, so only known others are refused. Asked once per installed file
    (path and modification time)."""
    try:
        mtime = os.stat(mpirun).st_mtime_ns
    except OSError as exc:
        return f"cannot stat it: {exc}"
    return _not_open_mpi(mpirun, mtime)


@functools.lru_cache(maxsize=8)
def _not_open_mpi(mpirun: str, mtime: int) -> str | None:
    try:
        done = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{mpirun} --version` failed: {exc}"
    said = " | ".join(line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip())
    if not any(mark in said for mark in OTHER_MPI_MARKS):
        return None
    return f"`{mpirun} --version` says: {said[:200]}"


def mpirun_stop_signal(config: Config) -> signal.Signals:
    """What stops a tensor-parallel instance's mpirun (its ranks' --stop-signal): SPANNING_STOP_SIGNAL, which mpirun
    forwards to its ranks and then exits with their status, 0 after a clean stop as a single worker's. On SIGTERM
    mpirun signals the ranks itself, SIGKILLs those still shutting down after a short grace and exits 1 even when
    every rank ended well. SIGTERM where that signal is the drain signal, which the ranks must keep ignoring."""
    return signal.SIGTERM if drain_signal(config) == SPANNING_STOP_SIGNAL else SPANNING_STOP_SIGNAL


class Process(NamedTuple):
    """A process as recorded at a stop: its pid and start time (field 22 of /proc/pid/stat, clock ticks after boot),
    so a pid the kernel has given to another process since is not taken for it (nor kept waiting on, nor killed)."""
    pid: int
    started: int


def processes(pids: list[int]) -> list[Process]:
    """The live ones of pids, recorded with their start times."""
    return [Process(pid, int(fields[19])) for pid in pids if (fields := proc_stat(pid)) is not None]


def running(recorded: list[Process]) -> list[Process]:
    """The recorded processes still running: their pid with the same start time (not another process that reused
    it), not a zombie (one waiting for its reaper has ended)."""
    live = []
    for proc in recorded:
        fields = proc_stat(proc.pid)
        if fields is not None and fields[0] != "Z" and int(fields[19]) == proc.started:
            live.append(proc)
    return live


class InstanceError(HpcllmError):
    """A request about instances that cannot be done; http_status says how the API answers it, param (if any)
    which field of the request to fix."""

    http_status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownInstance(InstanceError):
    http_status = 404
    code = "instance_not_found"


class GpusBusy(InstanceError):
    http_status = 409
    code = "gpus_busy"


class NotAccepting(InstanceError):
    http_status = 503
    code = "draining"


class InstanceNotServing(InstanceError):
    """The instance's worker serves nothing (failed, stopping): a change of its adapters has nowhere to go."""

    http_status = 409
    code = "instance_not_serving"


@dataclass
class MigrationOutcome:
    """What one instance's migrate call did: the worker's migrated / failed lists, or why the call failed."""

    instance_id: str
    model: str
    destination_url: str
    migrated: list[MigrationResult] = field(default_factory=list)
    failed: list[MigrationFailure] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.error is None and not self.failed


@dataclass
class Instance:
    instance_id: str
    model: str
    source: str
    path: Path
    tier: str
    gpu_ids: list[int]
    process: subprocess.Popen
    url_file: Path
    log_path: Path
    started_at: float
    state: str = "loading"
    worker_url: str | None = None
    load_seconds: float | None = None
    running_requests: int = 0
    tokens_in_flight: int | None = None  # from the worker's /ready: the controller's migration-cost inputs
    prefill_tokens_per_second: float | None = None
    error: str | None = None
    exit_code: int | None = None
    stopping: bool = False
    released: bool = False
    corrupt_copy: bool = False  # the worker's load failed on the local copy it read (BAD_COPY_EXITS)
    load_fill: Any = None  # hpcllm.node.cache.LoadFill: the staging copy its load writes (cache on load)
    promote_to: tuple[str, ...] = ()  # faster tiers to fill from the local copy it loaded, once it is ready
    ranks: int = 1  # tensor-parallel ranks: process is their mpirun
    nodes: int = 1  # nodes the ranks span (> 1: process is their srun)
    # The processes under the worker when the stop began (mpirun's ranks, a vLLM engine core, hpcllm's model process):
    # its GPUs stay in use until they are gone too, and the kill at the stop timeout covers them.
    children: list[Process] = field(default_factory=list)
    rank_loads: list[dict] = field(default_factory=list)  # a tensor-parallel lead's /ready: how each rank loaded
    failed_probes: int = 0  # health probes of its /ready that failed in a row while it was ready
    probe_error: str | None = None  # how the last one failed
    kill_at: float | None = None  # monotonic time the watcher SIGKILLs a worker it stopped (unhealthy, start timeout)
    killed: bool = False  # SIGKILLed: at kill_at the watcher logs what still runs
    lora_adapters: dict[str, str] = field(default_factory=dict)  # what its worker serves (started with, then loaded)
    lora_wanted: dict[str, str] | None = None  # a redeploy's adapters, applied once the worker is ready
    adapters_lock: threading.Lock = field(default_factory=threading.Lock)  # one change of its adapters at a time
    # The manager's instance-list versions (WorkerManager.version) that added it and that removed it (its stop).
    added_in: int = 0
    removed_in: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # set on stop: the watcher looks at once

    @property
    def active(self) -> bool:
        return self.state in ("loading", "ready", "draining")

    def rank_tiers(self) -> list[str]:
        """Where each rank read its slices, once the lead reported it: its node's slice copy or whole NVMe copy
        (nvme), else the instance's path (the tier the agent resolved)."""
        return [NVME if r.get("slice_copy") or r.get("node_copy") else self.tier for r in self.rank_loads]

    def load_tier(self) -> str:
        """The tier the instance loaded from: for tensor-parallel ranks the slowest kind any rank read from."""
        tiers = self.rank_tiers() or [self.tier]
        return max(tiers, key=lambda t: TIER_ORDER.index(t) if t in TIER_ORDER else len(TIER_ORDER))

    def info(self) -> InstanceInfo:
        return InstanceInfo(instance_id=self.instance_id, model=self.model, state=self.state,
                            worker_url=self.worker_url, gpu_ids=list(self.gpu_ids),
                            running_requests=self.running_requests, started_at=self.started_at,
                            load_tier=self.load_tier(), load_seconds=self.load_seconds,
                            tokens_in_flight=self.tokens_in_flight,
                            prefill_tokens_per_second=self.prefill_tokens_per_second, error=self.error,
                            tensor_parallel=self.ranks, rank_nodes=[str(r["node"]) for r in self.rank_loads],
                            rank_tiers=self.rank_tiers())


@dataclass
class Spare:
    """A worker process with its imports done, waiting on stdin for an assignment (hpcllm.worker.spare)."""

    process: subprocess.Popen
    log_path: Path
    started_at: float
    settled: bool = False  # seen alive SPARE_IMPORT_SECONDS after its start: its death later is no quick death


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = deque(f, maxlen=200)
    except OSError:
        return ""
    # A worker's own error line ("error: ...") says it best; else the last lines (a traceback's end).
    errors = [line.strip() for line in tail if line.startswith("error:")]
    return errors[-1] if errors else " | ".join(line.strip() for line in list(tail)[-lines:] if line.strip())


def vllm_python(config: Config) -> str:
    """The interpreter for vLLM workers (worker.vllm_python, else .venv-vllm); InstanceError saying what to do."""
    try:
        return vllm_launch.vllm_python(config)
    except vllm_launch.VllmInterpreterMissing as exc:
        raise InstanceError(str(exc)) from None


class WorkerManager:
    def __init__(self, config: Config, run_dir: Path, gpus: GpuInventory, cache=None,
                 config_path: Path | None = None, on_change: Callable[[], None] | None = None,
                 poll_seconds: float = 0.5, max_instances: int | None = None):
        self.config = config
        self.run_dir = run_dir
        # Instances this agent may run at once (1 on a model pool's node: its pinned instance, the controller
        # places nothing there): no spare waits beyond them. None: as many as the node's slots.
        self.max_instances = max_instances
        self.gpus = gpus
        self.cache = cache
        self.config_path = config_path
        self.on_change = on_change or (lambda: None)
        self.poll_seconds = poll_seconds
        self.accepting = True
        self._lock = threading.RLock()  # start() checks GPUs under the same lock
        self._instances: dict[str, Instance] = {}
        # The instance list's version: one more with every instance added or removed and every change of an
        # instance's state or worker URL (_new_version), from the clock at the start (first_instances_version: a
        # restarted agent's versions are above its old process's). The heartbeats carry it, and the start and stop
        # answers the version they made: the controller tells a report older than a change, or than a report it
        # already applied, by it.
        self.version = first_instances_version()
        self._spares: list[Spare] = []
        # Stopped instances whose processes outlived their SIGKILL: forgotten, but their GPUs in use until the watcher
        # sees the processes gone (they hold the GPUs' memory).
        self._leftovers: dict[str, Instance] = {}
        self._quick_spare_deaths = 0  # spares in a row that died within SPARE_IMPORT_SECONDS of their start
        self._spare_retry_at = 0.0  # monotonic time before which no spare starts (after quick deaths)
        self._http = internal_client(config.internal_http, timeout=5.0)
        self._key_known = threading.Event()
        self.set_key(config.cluster.shared_secret)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.read_tuning_path: Path | None = None  # the node probe's read settings, passed to every worker
        self.starts = 0  # workers and spares started: the read sweep measures again what one began during
        self._caching = 0  # loaded copies being written into the cache tiers (cache on load)

    def set_read_tuning(self, tuning: ReadTuning) -> Path:
        """Save the probe's read tuning in the run folder; workers started from now on load with it."""
        path = self.expect_read_tuning()
        tuning.save(path)
        return path

    def expect_read_tuning(self) -> Path:
        """Point workers at the run folder's read-tuning.json before it exists (the sweep still runs): each load
        reads the file when it begins, so even a spare started now loads with the sweep's result once it is there."""
        self.read_tuning_path = self.run_dir / "read-tuning.json"
        return self.read_tuning_path

    def busy(self) -> bool:
        """Something on this node reads for a load: a worker loading, a spare importing, a loaded copy being cached
        (the read sweep waits, so it neither slows a cold start nor measures a disk shared with one)."""
        with self._lock:
            self.settle_spares()
            importing = any(time.time() - sp.started_at < SPARE_IMPORT_SECONDS for sp in self._spares)
            return self.loading() or importing or self._caching > 0

    def loading(self) -> bool:
        """A worker loads its model."""
        with self._lock:
            return any(inst.state == "loading" for inst in self._instances.values())

    def set_key(self, key: str | None) -> None:
        """The key the workers are started with and called with (and the agent's API accepts): the cluster secret,
        or a token-registered node's key (docs/security.md). None: not known yet (nothing is accepted)."""
        self.key = key
        if key is None:
            self._key_known.clear()
            self._http.headers.pop(SECRET_HEADER, None)
        else:
            self._http.headers[SECRET_HEADER] = key
            self._key_known.set()

    def key_within(self, seconds: float) -> str | None:
        """The key, waiting up to `seconds` for it while a token registration is under way: the controller counts
        the node as registered (and a waiting cold start may call it) a moment before its answer, carrying the key,
        reaches this agent."""
        self._key_known.wait(seconds)
        return self.key

    # ------------------------------------------------------------------------------------------------ queries

    def instances(self) -> list[Instance]:
        with self._lock:
            return list(self._instances.values())

    def infos(self) -> list[InstanceInfo]:
        return self.listing()[0]

    def listing(self) -> tuple[list[InstanceInfo], int]:
        """The instances' infos and the version of the list they are in (read together)."""
        with self._lock:  # a state changes with its version under it (_set_state): both from one moment
            return [inst.info() for inst in self._instances.values()], self.version

    def get(self, instance_id: str) -> Instance:
        with self._lock:
            inst = self._instances.get(instance_id)
        if inst is None:
            raise UnknownInstance(f"no instance {instance_id!r} on this node")
        return inst

    def gpus_in_use(self) -> set[int]:
        """GPUs of active instances, and of failed or stopped ones whose worker still runs (an unhealthy worker being
        stopped holds its GPU memory until it is gone, a tensor-parallel one until its last rank is, one that outlived
        its SIGKILL as long as it lives)."""
        return {g for inst in self._holding() for g in inst.gpu_ids}

    def _holding(self) -> list[Instance]:
        """The instances holding their slot here: active ones, and stopped or failed ones still running."""
        with self._lock:
            watched = [*self._instances.values(), *self._leftovers.values()]
        return [inst for inst in watched if inst.active or self._still_running(inst)]

    @staticmethod
    def _still_running(inst: Instance) -> bool:
        """Its worker, or a process it left behind at the stop (mpirun may exit before its ranks: on SIGTERM, sent
        where slurm.signal is USR2, mpirun_stop_signal; a worker may leave a hung engine process)."""
        return inst.process.poll() is None or bool(running(inst.children))

    # ------------------------------------------------------------------------------------------------- start

    def _check_gpus(self, gpu_ids: list[int]) -> None:
        if len(set(gpu_ids)) != len(gpu_ids):
            raise InstanceError(f"gpu_ids {gpu_ids} name a GPU twice")
        unknown = [g for g in gpu_ids if not 0 <= g < self.gpus.count]
        if unknown:
            raise InstanceError(f"gpu_ids {unknown} do not exist on this node (it has {self.gpus.count} GPUs: "
                                f"ids 0..{self.gpus.count - 1})")
        busy = set(gpu_ids) & self.gpus_in_use()
        if busy:
            raise GpusBusy(f"GPUs {sorted(busy)} are used by another instance on this node")

    def _resolve(self, model: str, source: Path) -> tuple[Path, str]:
        """Where to load from; a cached copy chosen is acquired by this process in the same step (release() it), so
        an evict cannot take it between the choice and the start: one evicted just before is passed over."""
        if self.cache is not None:
            path, tier = self.cache.path_for_load(model, source, hold=True)
            return Path(path), tier
        return source, "sharedfs"

    def _cache_on_load(self, req: StartInstance, tier: str) -> tuple[tuple[str, ...], Any]:
        """(tiers to fill from the local copy once ready, LoadFill for the worker's tee) for a load from `tier`:
        the faster tiers named by the model's cache_on_load (else node.cache_on_load) that lack the model."""
        wanted = req.cache_on_load if req.cache_on_load is not None else self.config.node.cache_on_load
        targets = tuple(t for t in FASTER_TIERS.get(tier, ()) if t in wanted)
        # Tensor-parallel ranks read slices, not whole chunks: nothing to tee (the copy needs every byte).
        if self.cache is None or not targets or req.engine != "hpcllm" or req.tensor_parallel > 1:
            return (), None
        if tier in LOCAL_TIERS:  # a local copy exists: fill the faster tiers from it after the load
            return targets, None
        try:
            return (), self.cache.begin_load_fill(req.model, req.source, targets)
        except HpcllmError as exc:  # the cache is an optimisation: the load goes on without it
            log.warning("no copy of %s on load: %s", req.model, exc)
            return (), None

    @staticmethod
    def _mpirun_refusal(req: StartInstance) -> str | None:
        """Why this node's mpirun cannot launch the ranks of req (tensor-parallel on this node alone), or None. Asked
        before start() takes the lock: not_open_mpi may run `mpirun --version` (up to 30 s), and listing() (the
        agent's heartbeats), get() and stop() wait on that lock."""
        if req.tensor_parallel == 1 or req.nodes > 1 or req.engine != "hpcllm":  # not launched by mpirun
            return None
        if (mpirun := shutil.which(MPIRUN)) is None:
            return (f"tensor_parallel = {req.tensor_parallel} needs {MPIRUN!r} on this node's PATH "
                    f"(OpenMPI: apt-get install openmpi-bin, or the site's MPI module)")
        if (other := not_open_mpi(mpirun)) is not None:
            return (f"tensor_parallel = {req.tensor_parallel} needs Open MPI's {MPIRUN!r}, but {mpirun} is not "
                    f"Open MPI ({other}): the agent passes it Open MPI's options (--mca) and relies on it forwarding "
                    f"the stop signal to the ranks; put Open MPI's mpirun first on this node's PATH (apt-get install "
                    f"openmpi-bin, or the site's Open MPI module)")
        return None

    def _check_tensor_parallel(self, req: StartInstance, mpirun_refusal: str | None) -> None:
        """Refuse a tensor-parallel start this node cannot run, before a copy or GPU is taken (mpirun_refusal: what
        _mpirun_refusal said, asked before the lock)."""
        if req.tensor_parallel % req.nodes:  # also tensor_parallel = 1 over 2 nodes: no rank for the second
            raise InstanceError(f"tensor_parallel = {req.tensor_parallel} ranks do not split evenly over "
                                f"{req.nodes} nodes: nodes must divide tensor_parallel")
        if req.tensor_parallel == 1:
            return
        if req.engine != "hpcllm":
            raise InstanceError(f"tensor_parallel = {req.tensor_parallel} runs on hpcllm's engine only, not "
                                f"engine = {req.engine!r}; deploy the model with tensor_parallel = 1")
        slices = [self.gpus.names[g] for g in req.gpu_ids if self.gpus.names[g].startswith(MIG_PREFIX)]
        if slices:
            raise InstanceError(f"tensor_parallel = {req.tensor_parallel} cannot run on MIG slices "
                                f"({', '.join(slices)}): CUDA shows a process only one MIG device, so its ranks "
                                f"cannot each reach theirs; deploy the model with tensor_parallel = 1, or on whole "
                                f"GPUs")
        if req.gpu_ids and len(req.gpu_ids) % req.tensor_parallel:
            raise InstanceError(f"{len(req.gpu_ids)} GPUs cannot be shared by {req.tensor_parallel} tensor-parallel "
                                f"ranks: give each rank the same number of GPUs")
        if req.nodes > 1:
            self._check_spanning(req)
        elif mpirun_refusal is not None:
            raise InstanceError(mpirun_refusal)

    def _check_spanning(self, req: StartInstance) -> None:
        """An instance over several nodes needs a Slurm job of that many nodes around this agent, and srun."""
        job_nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
        if not os.environ.get("SLURM_JOB_ID") or not job_nodes:
            raise InstanceError(f"an instance over {req.nodes} nodes starts its ranks with srun inside this agent's "
                                f"Slurm allocation, and this agent runs outside Slurm")
        if int(job_nodes) < req.nodes:
            raise InstanceError(f"an instance over {req.nodes} nodes needs an allocation of {req.nodes} nodes; this "
                                f"agent's job {os.environ['SLURM_JOB_ID']} has {job_nodes}")
        if shutil.which(SRUN) is None:
            raise InstanceError(f"an instance over {req.nodes} nodes needs {SRUN!r} on this node's PATH")
        if drain_signal(self.config) == SPANNING_STOP_SIGNAL:
            raise InstanceError(f"slurm.signal = {self.config.slurm.signal} is the signal that stops an instance "
                                f"over several nodes ({SPANNING_STOP_SIGNAL.name}): drain with another one (USR1)")

    def _command(self, req: StartInstance, path: Path, url_file: Path) -> list[str]:
        worker = self.config.worker
        python = vllm_python(self.config) if req.engine == "vllm" else sys.executable
        command = [python, "-m", "hpcllm.cli.main", "worker", "--engine", req.engine, "--model", str(path),
                   "--name", req.model,
                   "--host", worker.listen_host, "--port", "0", "--url-file", str(url_file),
                   "--device", "cuda" if req.gpu_ids else worker.device]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        if req.max_model_len is not None:
            command += ["--max-model-len", str(req.max_model_len)]
        for name, folder in sorted(req.lora_adapters.items()):
            command += ["--lora-module", f"{name}={folder}"]
        if req.nodes > 1:
            ranks_here = req.tensor_parallel // req.nodes
            # The allocation is the instance's own: each node's CPUs are its ranks' (Slurm binds the job to them).
            threads = worker.cpu_threads or max(1, len(os.sched_getaffinity(0)) // ranks_here)
            return (srun_launch(req.tensor_parallel, req.nodes, len(req.gpu_ids)) + command
                    + ["--threads", str(threads), "--tensor-parallel", "--stop-signal", SPANNING_STOP_SIGNAL.name])
        command += ["--threads", str(self.threads_for(req.gpu_ids, req.tensor_parallel))]
        if req.tensor_parallel > 1:
            return (mpi_launch(req.tensor_parallel, cpu=not req.gpu_ids) + command
                    + ["--tensor-parallel", "--stop-signal", mpirun_stop_signal(self.config).name])
        return command

    def threads_for(self, gpu_ids: list[int], ranks: int = 1) -> int:
        """Torch threads of one worker (per rank of a tensor-parallel one): worker.cpu_threads, else its share of
        the CPUs this agent may use (Slurm binds the job to them): 1/cpu_slots_per_node for a CPU instance, its
        GPUs' fraction for a GPU one, divided among its ranks."""
        if self.config.worker.cpu_threads:
            return self.config.worker.cpu_threads
        cpus = len(os.sched_getaffinity(0))
        if gpu_ids:
            return max(1, cpus * len(gpu_ids) // max(1, self.gpus.count) // ranks)
        return max(1, cpus // self.config.controller.cpu_slots_per_node // ranks)

    def _worker_key(self) -> str:
        if self.key is None:
            raise InstanceError("this node has no key for its workers yet (not registered with the controller)")
        return self.key

    def _environment(self, gpu_ids: list[int], ranks: int = 1, key_later: bool = False) -> dict[str, str]:
        """key_later: a spare's, which may start before the agent registered; its assignment carries the key."""
        env = dict(os.environ)
        if ranks > 1 and os.geteuid() == 0:  # OpenMPI refuses root without both (the dev cluster runs as root)
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.pop(SECRET_ENV, None)
        key = self.key if key_later else self._worker_key()
        if key is not None:
            env[SECRET_ENV] = key
        for name in (TOKEN_ENV, TOKEN_FILE_ENV):  # the agent's own credential: a worker never needs it
            env.pop(name, None)
        if self.read_tuning_path is not None:  # loads read with the settings the node's probe found fastest
            env[TUNING_ENV] = str(self.read_tuning_path)
        # A CPU instance sees no GPU; a GPU instance only its own.
        env["CUDA_VISIBLE_DEVICES"] = self.gpus.visible_devices(gpu_ids) if gpu_ids else ""
        return env

    def _spanning_environment(self, gpu_ids: list[int]) -> dict[str, str]:
        """srun's ranks: the workers' environment (the node's key, never the agent's token; the read settings), but
        a CPU instance's ranks see no GPU and a GPU one's get theirs from Slurm on each node (the step's --gres)."""
        env = self._environment([], ranks=2)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if not gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def _spawn(self, req: StartInstance, path: Path, url_file: Path, log_path: Path,
               cache_into: Path | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as log_file:
            command = self._command(req, path, url_file)
            if cache_into is not None:  # cache on load: the worker tees what it reads there
                command += ["--cache-into", str(cache_into)]
            if req.nodes > 1:
                env = self._spanning_environment(req.gpu_ids)
            else:
                env = self._environment(req.gpu_ids, req.tensor_parallel)
            # A pipe the agent holds until the worker is gone: its end tells the worker (mpirun forwards it to the
            # lead rank, srun to task 0: srun_launch) that the agent died, killed where nothing ends its workers with
            # it (Slurm ends a spanning instance's step only with the whole job, which may outlive its agent).
            env[AGENT_STDIN_ENV] = "1"
            return subprocess.Popen(command, env=env,
                                    stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                                    preexec_fn=ignore_drain_signal(self.config))

    # ------------------------------------------------------------------------------------------------ spares

    def free_slots(self) -> int:
        """Instances of one slot that could still start here: GPUs not in use, and CPU slots (the controller's
        controller.cpu_slots_per_node, which it places CPU instances by) not taken by a CPU instance's ranks here,
        counted as gpus_in_use counts (active instances, and stopped or failed ones whose processes still run); at
        most max_instances less those."""
        holding = self._holding()
        cpu_ranks = sum(inst.ranks // inst.nodes for inst in holding if not inst.gpu_ids)
        free_cpu = max(0, self.config.controller.cpu_slots_per_node - cpu_ranks)
        free = free_cpu + self.gpus.count - len({g for inst in holding for g in inst.gpu_ids})
        if self.max_instances is not None:
            free = min(free, max(0, self.max_instances - len(holding)))
        return free

    def ensure_spares(self) -> None:
        """Keep node.spare_workers spare workers (imports done) waiting, while this agent takes instances, but no
        more than free slots: where every slot is taken no instance can start, and an idle spare would only hold
        its memory (its host pool, its imports twice with its model process) and CPU beside the running streams.
        The heartbeat a stop wakes calls this again; a start that took no spare (vLLM, tensor-parallel ranks) and
        filled the slots ends those beyond the free slots here."""
        with self._lock:
            self.settle_spares()
            for spare in list(self._spares):
                if spare.process.poll() is not None:
                    self._forget_dead_spare(spare)
            wanted = min(self.config.node.spare_workers, self.free_slots())
            surplus, self._spares = self._spares[wanted:], self._spares[:wanted]
            backing_off = time.monotonic() < self._spare_retry_at
            while not backing_off and self.accepting and len(self._spares) < wanted:  # never with a surplus
                try:
                    self._spares.append(self._spawn_spare())
                except Exception as exc:  # any (the worker's environment, an HpcllmError): the caller (a
                    # load's end, a heartbeat) goes on; a quick death, so a start that fails every time backs off
                    log.warning("cannot start a spare worker: %s", exc)
                    self._spare_ended(settled=False)
                    break
        self._end_spares(surplus)  # outside the lock: each may take seconds to go

    def settle_spares(self) -> None:
        """Mark the spares seen alive SPARE_IMPORT_SECONDS after their start: a later death (the OOM killer while
        a long load ran) is then no quick death. Called wherever spares are looked at, the heartbeat's every turn
        included (which starts none while a worker loads)."""
        with self._lock:
            now = time.time()
            for spare in self._spares:
                if now - spare.started_at >= SPARE_IMPORT_SECONDS and spare.process.poll() is None:
                    spare.settled = True

    def _spawn_spare(self) -> Spare:
        log_path = self.run_dir / f"spare-{uuid.uuid4().hex[:8]}.log"
        # No GPU until assigned: CUDA must not start before it knows its devices. No key where the agent has not
        # registered yet (its spare starts while it registers): the assignment brings it.
        env = self._environment([], key_later=True)
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() without initialising CUDA
        env[HOST_POOL_ENV] = str(self._spare_pool_bytes())
        # The spare starts the model process too where a CPU worker of hpcllm's engine would use one.
        env[MODEL_PROCESS_ENV] = "1" if self.config.worker.model_process_for(self.config.worker.device) else "0"
        env[AGENT_STDIN_ENV] = "1"  # as an instance's worker it watches the pipe its assignment came through
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "hpcllm.worker.spare"], env=env, stdin=subprocess.PIPE,
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       preexec_fn=ignore_drain_signal(self.config))
        log.info("spare worker pid %d started (log %s)", process.pid, log_path)
        self.starts += 1
        return Spare(process, log_path, time.time())

    def _spare_pool_bytes(self) -> int:
        """Host memory a spare reserves pre-faulted: the largest checkpoint this node caches (what a CPU load of
        any of its models needs), at most node.spare_host_pool_gb; 0 without a cache or with the option off."""
        cap = int(self.config.node.spare_host_pool_gb * 1e9)
        if cap <= 0 or self.cache is None:
            return 0
        try:
            largest = max((copy.bytes for copy in self.cache.list() if copy.tensor_parallel is None), default=0)
        except (OSError, HpcllmError) as exc:  # an optimisation: the spare then loads into fresh memory
            log.warning("cannot size the spare's host pool from the cache: %s", exc)
            return 0
        return min(cap, largest)

    def _assign_spare(self, req: StartInstance, path: Path, url_file: Path, log_path: Path,
                      cache_into: Path | None = None) -> subprocess.Popen | None:
        """Hand the instance to a live spare (its log becomes the instance's log); None when there is none. The key
        goes with the assignment: the spare may have started before the agent registered and knew it."""
        key = self._worker_key()
        self.settle_spares()
        while self._spares:
            spare = self._spares[0]
            if spare.process.poll() is not None:
                self._forget_dead_spare(spare)
                continue
            self._spares.pop(0)
            assignment = SpareAssignment(
                model_path=str(path), model_name=req.model, device="cuda" if req.gpu_ids else self.config.worker.device,
                url_file=str(url_file), config_path=str(self.config_path) if self.config_path else None,
                max_model_len=req.max_model_len, threads=self.threads_for(req.gpu_ids),
                cache_into=str(cache_into) if cache_into is not None else None,
                lora_adapters=dict(req.lora_adapters),
                env={"CUDA_VISIBLE_DEVICES": self.gpus.visible_devices(req.gpu_ids) if req.gpu_ids else "",
                     SECRET_ENV: key})
            try:
                spare.process.stdin.write(assignment.model_dump_json().encode() + b"\n")
                spare.process.stdin.flush()  # kept open: the worker stops at its end (the agent's death)
            except OSError:  # it died meanwhile: try the next one, else start a fresh worker
                spare.process.kill()
                spare.process.wait()
                # The pipe goes now, not when the Popen is collected; closing flushes the unsent assignment again,
                # which fails (BrokenPipeError) with the pipe closed all the same.
                with contextlib.suppress(BrokenPipeError):
                    spare.process.stdin.close()
                spare.log_path.unlink(missing_ok=True)
                continue
            os.replace(spare.log_path, log_path)  # the open log keeps its file: now under the instance's name
            log.info("spare worker pid %d (started %.0f s ago) takes %s", spare.process.pid,
                     time.time() - spare.started_at, req.model)
            return spare.process
        return None

    def _forget_dead_spare(self, spare: Spare) -> None:
        self._spares.remove(spare)
        log.warning("spare worker pid %d exited with status %s: %s", spare.process.pid, spare.process.returncode,
                    log_tail(spare.log_path) or "no output")
        spare.log_path.unlink(missing_ok=True)
        # Not seen alive past its imports: the death is noticed only at the next check (a heartbeat), so its age
        # now is no measure of how long it lived.
        self._spare_ended(spare.settled)

    def _spare_ended(self, settled: bool) -> None:
        """Count a spare's end: one that settled resets the quick deaths, another quick death (or a failed start)
        from the second in a row stops spare starts for a while (SPARE_RETRY_SECONDS, doubling)."""
        self._quick_spare_deaths = 0 if settled else self._quick_spare_deaths + 1
        if self._quick_spare_deaths >= 2:
            doublings = min(self._quick_spare_deaths - 2, 16)  # past the cap anyway; 2.0 ** 1024 overflows a float
            delay = min(SPARE_RETRY_SECONDS * 2 ** doublings, SPARE_RETRY_MAX_SECONDS)
            self._spare_retry_at = time.monotonic() + delay
            log.warning("%d spare workers in a row died within %.0f s of their start (or did not start): the next "
                        "starts in %.0f s", self._quick_spare_deaths, SPARE_IMPORT_SECONDS, delay)

    def retire_spares(self) -> None:
        """Stop the waiting spares (closing stdin ends them; SIGKILL if one does not go)."""
        with self._lock:
            spares, self._spares = self._spares, []
        self._end_spares(spares)

    @staticmethod
    def _end_spares(spares: list[Spare]) -> None:
        for spare in spares:
            try:
                spare.process.stdin.close()
            except OSError:
                pass
            if not exited_within(spare.process, 5):
                spare.process.kill()
                spare.process.wait()
            spare.log_path.unlink(missing_ok=True)

    def _check_context_length(self, req: StartInstance, path: Path) -> None:
        """A max_model_len over the model's context length is refused here (400), by the rule the controller, the
        gateway and the worker share, not left to a worker that fails its load and shows the instance failed."""
        if req.max_model_len is None:
            return
        try:
            source_max_model_len(path, req.max_model_len)
        except ContextLengthError as exc:
            raise InstanceError(str(exc), "max_model_len") from None

    def _launch(self, req: StartInstance, path: Path, tier: str) -> Instance:
        """Start the worker of one instance (a spare, else a fresh process) from `path`; whatever goes wrong, no
        copy on load is left behind, and a worker that started is not left running without its instance."""
        promote_to, fill = self._cache_on_load(req, tier)
        instance_id = f"{req.model}-{uuid.uuid4().hex[:8]}"
        url_file = self.run_dir / f"{instance_id}.url"
        log_path = self.run_dir / f"{instance_id}.log"
        inst = None
        try:
            cache_into = fill.staging if fill is not None else None
            # Spares run this interpreter with hpcllm's engine imported; vLLM workers start fresh.
            # Spares are single processes: tensor-parallel ranks start fresh under mpirun; vLLM workers too.
            use_spare = req.engine == "hpcllm" and req.tensor_parallel == 1
            spare = self._assign_spare(req, path, url_file, log_path, cache_into) if use_spare else None
            process = spare or self._spawn(req, path, url_file, log_path, cache_into)
            inst = Instance(instance_id, req.model, req.source, path, tier, list(req.gpu_ids), process, url_file,
                            log_path, time.time(), load_fill=fill, promote_to=promote_to,
                            ranks=req.tensor_parallel, nodes=req.nodes)
            if tier in LOCAL_TIERS and self.cache is not None:
                # The worker holds the copy from now on: if this agent dies, the reference dies with the worker.
                self.cache.acquire(req.model, tier, pid=process.pid)
        except BaseException as exc:
            if inst is not None:
                self._kill(inst)
                inst.process.wait()
                if inst.process.stdin is not None:  # its pipe: closed now, not when a collection finds the frame
                    inst.process.stdin.close()
            if fill is not None:
                self.cache.discard_load_fill(fill)
            if isinstance(exc, OSError):
                raise InstanceError(f"cannot start a worker for {req.model!r}: {exc}") from None
            raise
        return inst

    def start(self, req: StartInstance) -> Instance:
        source = Path(req.source)
        mpirun_refusal = self._mpirun_refusal(req)  # outside the lock: it may wait on `mpirun --version`
        with self._lock:
            if not self.accepting:
                raise NotAccepting("this node agent is draining and takes no new instances")
            self._check_gpus(req.gpu_ids)
            self._check_tensor_parallel(req, mpirun_refusal)
            if req.engine == "vllm":
                vllm_python(self.config)  # refuse now, with the reason, before anything is allocated
            # Ranks on other nodes cannot read this node's cached copies: a spanning instance reads the origin.
            path, tier = (source, "sharedfs") if req.nodes > 1 else self._resolve(req.model, source)
            held = tier in LOCAL_TIERS  # _resolve acquired the copy: not evicted while its worker starts
            try:
                if not path.exists():
                    raise InstanceError(f"checkpoint {path} of model {req.model!r} does not exist on this node")
                self._check_context_length(req, path)
                inst = self._launch(req, path, tier)
                inst.lora_adapters = dict(req.lora_adapters)
            finally:  # started or not: a started worker holds the copy with a reference of its own
                if held:
                    self.cache.release(req.model, tier)
            self._instances[inst.instance_id] = inst
            inst.added_in = self._new_version()
            self.starts += 1
        launcher = (f"srun of {req.tensor_parallel} tensor-parallel ranks over {req.nodes} nodes" if req.nodes > 1
                    else f"mpirun of {req.tensor_parallel} tensor-parallel ranks")
        log.info("instance %s: worker pid %d%s loading %s from %s (%s)", inst.instance_id, inst.process.pid,
                 f" ({launcher})" if req.tensor_parallel > 1 else "",
                 req.model, path, tier)
        threading.Thread(target=self._watch, args=(inst,), name=f"watch-{inst.instance_id}", daemon=True).start()
        return inst

    # ------------------------------------------------------------------------------------------------- watch

    def _new_version(self) -> int:
        """The instance list changed (an instance added or removed, one's state or worker URL): one version more,
        counted after the change is made, so a report listing the old state never carries the new version."""
        with self._lock:
            self.version += 1
            return self.version

    def _set_state(self, inst: Instance, state: str, error: str | None = None) -> None:
        # With its version, under the lock: a report listing the new state with the old version would let a late
        # report of the old state (ready before failed) undo the new one.
        with self._lock:
            if inst.state == state:
                return
            was_loading = inst.state == "loading"
            inst.state = state
            if error:
                inst.error = error
            self._new_version()
        log.info("instance %s (%s): %s%s", inst.instance_id, inst.model, state, f": {error}" if error else "")
        self.on_change()  # first: the heartbeat saying it is ready must not wait for a surplus spare to end
        if was_loading:
            self.ensure_spares()  # after the load, not during it: a spare's imports would compete for the CPU

    def _poll_ready(self, inst: Instance) -> None:
        """Ask the worker's /ready: loading -> ready, its request counts; a ready worker's failed answers are
        counted (inst.failed_probes) for the watcher's health check."""
        if inst.worker_url is None:
            try:
                worker_url = inst.url_file.read_text().strip() or None
            except OSError:
                return
            if worker_url:
                with self._lock:  # with its version, as a state (_set_state)
                    inst.worker_url = worker_url
                    self._new_version()
                self.on_change()
        if inst.worker_url is None:
            return
        checking = inst.state == "ready"  # a loading worker answers 503 until its engine runs; a draining one stops
        try:
            resp = self._http.get(f"{inst.worker_url}/ready", timeout=self.config.node.worker_health_timeout_seconds)
        except httpx.HTTPError as exc:
            if checking:
                self._probe_failed(inst, f"no answer ({type(exc).__name__}: {exc})")
            return
        body = json_object(resp) if resp.status_code == 200 else None
        if not body:  # a 503 (engine dead or hung), another error, or an answer that is not /ready's
            if checking:
                self._probe_failed(inst, f"HTTP {resp.status_code}: {error_of(resp)[1]}")
            return
        inst.failed_probes = 0
        inst.running_requests = int(body.get("running_requests") or 0) + int(body.get("waiting_requests") or 0)
        inst.tokens_in_flight = body.get("tokens_in_flight")
        inst.prefill_tokens_per_second = body.get("prefill_tokens_per_second") or None
        if inst.load_seconds is None and body.get("load_seconds") is not None:
            inst.load_seconds = float(body["load_seconds"])
        if not inst.rank_loads and len(body.get("rank_loads") or []) == inst.ranks:
            inst.rank_loads = sorted(body["rank_loads"], key=lambda r: r["rank"])
        if inst.state == "loading" and self._ready_with_wanted_adapters(inst):
            if inst.load_fill is not None or inst.promote_to:
                threading.Thread(target=self._keep_loaded_copy, args=(inst,),
                                 name=f"cache-{inst.instance_id}", daemon=True).start()

    # ------------------------------------------------------------------------------------------ LoRA adapters

    def set_lora_adapters(self, instance_id: str, wanted: dict[str, str]) -> LoraAdaptersApplied:
        """A redeploy's adapters: the instance's worker unloads those no longer wanted (or wanted from another
        folder; their running requests end first) and loads the others. A worker still loading gets them once it
        is ready (pending)."""
        inst = self.get(instance_id)
        with inst.adapters_lock:
            if inst.state == "loading":
                inst.lora_wanted = dict(wanted)
                return LoraAdaptersApplied(instance_id=instance_id, lora_adapters=inst.lora_adapters, pending=True)
            if inst.state not in ("ready", "draining") or inst.worker_url is None or inst.stopping:
                raise InstanceNotServing(f"instance {instance_id} is {inst.state}: its worker serves no adapters")
            inst.lora_wanted = None
            return self._apply_adapters(inst, wanted)

    def _ready_with_wanted_adapters(self, inst: Instance) -> bool:
        """The loading worker answers: the adapters a redeploy asked for while it loaded are applied first, then it
        is ready (routes to it start), so no request for an adapter reaches it before the adapter. If they cannot
        all be served it is stopped as failed, never ready: the controller starts another (with the model's
        adapters) rather than route requests for an adapter to a worker without it."""
        with inst.adapters_lock:  # held until ready: a change asked meanwhile waits, then applies to a ready one
            wanted, inst.lora_wanted = inst.lora_wanted, None
            applied = None if wanted is None or wanted == inst.lora_adapters else self._apply_adapters(inst, wanted)
            if applied is None or not applied.failed:
                self._set_state(inst, "ready")
                return True
        inst.error = f"could not serve its model's LoRA adapters after a redeploy: {applied.failures()}"
        self._stop_failed(inst)
        return False

    def _apply_adapters(self, inst: Instance, wanted: dict[str, str]) -> LoraAdaptersApplied:
        """Unload, then load, through the worker's API (under inst.adapters_lock); each failure is recorded by name
        and the rest goes on. inst.lora_adapters follows the worker's answers."""
        worker = WorkerClient(inst.worker_url, self.key or "", client=self._http)
        failed: dict[str, AdapterFailure] = {}
        for name in sorted(n for n, folder in inst.lora_adapters.items() if wanted.get(n) != folder):
            try:
                inst.lora_adapters = worker.unload_lora_adapter(name).lora_adapters
            except WorkerError as exc:
                if exc.status == 404:  # already gone
                    inst.lora_adapters = {n: f for n, f in inst.lora_adapters.items() if n != name}
                else:
                    failed[name] = AdapterFailure(status=exc.status, message=str(exc))
        for name, folder in sorted(wanted.items()):
            if name in inst.lora_adapters or name in failed:
                continue
            try:
                inst.lora_adapters = worker.load_lora_adapter(name, folder).lora_adapters
            except WorkerError as exc:
                failed[name] = AdapterFailure(status=exc.status, message=str(exc))
        applied = LoraAdaptersApplied(instance_id=inst.instance_id, lora_adapters=inst.lora_adapters, failed=failed)
        if failed:
            log.warning("instance %s (%s): LoRA adapters not applied: %s", inst.instance_id, inst.model,
                        applied.failures())
        else:
            log.info("instance %s (%s): serves LoRA adapters %s", inst.instance_id, inst.model,
                     ", ".join(sorted(inst.lora_adapters)) or "none")
        return applied

    def _probe_failed(self, inst: Instance, reason: str) -> None:
        inst.failed_probes += 1
        inst.probe_error = reason
        log.warning("instance %s (%s): health probe %d of %d of %s/ready failed: %s", inst.instance_id, inst.model,
                    inst.failed_probes, self.config.node.worker_health_failures, inst.worker_url, reason)

    def _unhealthy(self, inst: Instance) -> bool:
        """A ready worker whose last node.worker_health_failures probes failed (one slow answer is not a death)."""
        if inst.state != "ready" or inst.failed_probes < self.config.node.worker_health_failures:
            return False
        inst.error = (f"unhealthy: {inst.failed_probes} health probes of its /ready failed in a row "
                      f"(node.worker_health_failures), the last: {inst.probe_error}")
        return True

    def _watch(self, inst: Instance) -> None:
        node = self.config.node
        deadline = inst.started_at + node.worker_start_timeout_seconds
        try:
            while True:
                if not self._still_running(inst):
                    self._exited(inst, inst.process.returncode)
                    return
                if inst.stopping:
                    self._kill_when_overdue(inst)
                else:
                    self._poll_ready(inst)
                    if inst.state == "loading" and time.time() > deadline:
                        inst.error = (f"not ready after {node.worker_start_timeout_seconds:.0f} s "
                                      f"(node.worker_start_timeout_seconds)")
                        self._stop_failed(inst)
                        continue
                    if self._unhealthy(inst):
                        self._stop_failed(inst)
                        continue
                inst.wake.wait(self.poll_seconds if inst.state == "loading" else
                               max(self.poll_seconds, node.worker_health_seconds))
                inst.wake.clear()
        finally:
            self._release(inst)
            if inst.process.stdin is not None:  # the worker's pipe (AGENT_STDIN_ENV): no fd left per instance
                inst.process.stdin.close()
            fill = self._take_fill(inst)
            if fill is not None:  # it never became ready: its partial copy goes
                self.cache.discard_load_fill(fill)
            if inst.corrupt_copy:
                self._replace_corrupt_copy(inst)
            inst.done.set()
            with self._lock:
                self._leftovers.pop(inst.instance_id, None)

    def _stop_failed(self, inst: Instance) -> None:
        """A worker that will not serve (not ready in time, unhealthy): reported failed at once, so the controller
        routes elsewhere while it stops; SIGTERM now, SIGKILL after node.worker_stop_timeout_seconds (a hung engine
        may not end on SIGTERM). Its copy and GPUs are released once the process is gone."""
        self._set_state(inst, "failed", inst.error)
        inst.kill_at = time.monotonic() + self.config.node.worker_stop_timeout_seconds
        self._terminate(inst)

    def _kill_when_overdue(self, inst: Instance) -> None:
        if inst.kill_at is None or time.monotonic() <= inst.kill_at or not self._still_running(inst):
            return
        if inst.killed:  # its GPUs stay in use: the processes hold their memory while they live
            self._log_unkilled(inst)
            inst.kill_at = None
            return
        log.warning("instance %s did not stop within %.0f s of %s: SIGKILL", inst.instance_id,
                    self.config.node.worker_stop_timeout_seconds, self._stop_signal(inst).name)
        self._kill(inst)
        inst.killed, inst.kill_at = True, time.monotonic() + KILL_WAIT_SECONDS

    def _exited(self, inst: Instance, code: int) -> None:
        inst.exit_code = code
        if inst.stopping and inst.error is None:
            self._set_state(inst, "stopped")
            return
        reason = inst.error or log_tail(inst.log_path) or "no output"
        # Tensor-parallel ranks also read their node's slice copies, whatever tier the instance loads from.
        inst.corrupt_copy = code in BAD_COPY_EXITS and (inst.tier in LOCAL_TIERS or inst.ranks > 1)
        self._set_state(inst, "failed", f"worker exited with status {code}: {reason}")

    def _take_fill(self, inst: Instance):
        with self._lock:
            fill, inst.load_fill = inst.load_fill, None
        return fill

    def _keep_loaded_copy(self, inst: Instance) -> None:
        """Cache on load, once the instance is ready: commit the copy its load wrote (verified first), or fill the
        faster tiers from the local copy it loaded. Never affects the instance; failures are logged."""
        with self._lock:
            self._caching += 1
            self.starts += 1
        try:
            fill = self._take_fill(inst)
            if fill is not None:
                self.cache.wait_for_tee(fill, lambda: inst.process.poll() is None,
                                        self.config.node.worker_start_timeout_seconds)
                copies = self.cache.commit_load_fill(fill)
                log.info("instance %s: kept its load of %s in %s", inst.instance_id, inst.model,
                         ", ".join(c.tier for c in copies) or "no tier")
            for tier in inst.promote_to:
                self.cache.warm(inst.model, inst.source, tier)  # DRAM from the node's NVMe copy, not the origin
                log.info("instance %s: copied %s from %s to %s", inst.instance_id, inst.model, inst.tier, tier)
        except HpcllmError as exc:
            log.warning("instance %s: no cached copy of %s on load: %s", inst.instance_id, inst.model, exc)
        except Exception:
            log.exception("instance %s: cache on load of %s failed", inst.instance_id, inst.model)
        finally:
            with self._lock:
                self._caching -= 1
        self.on_change()  # the next heartbeat tells the controller about the new copies

    def _replace_corrupt_copy(self, inst: Instance) -> None:
        """The load failed on a cached copy (a checksum mismatch, a file cut short or missing): drop it and refill
        it from the origin (the origin is never dropped), so the next instance loads good bytes, or from the origin
        when the refill fails, and never from the broken copy. A tensor-parallel instance's: the copies its ranks
        here read, those found corrupt (CacheManager.verify_tensor_parallel_copies)."""
        if self.cache is None:
            return
        try:
            if inst.ranks > 1:  # which of its ranks' copies is bad: those its error names, else its slice copies
                results = self.cache.verify_tensor_parallel_copies(inst.model, inst.ranks, inst.tier,
                                                                   inst.error or "")
            else:
                results = [self.cache.handle_corrupt(inst.model, inst.tier,
                                                     f"instance {inst.instance_id}: {inst.error}")]
            for result in results:
                if not result.ok:
                    log.warning("corrupt %s copy of %s: %s (%s)", result.tier, result.model, result.action,
                                result.message)
        except Exception:
            log.exception("replacing the corrupt %s copy of %s failed", inst.tier, inst.model)
        self.on_change()

    def _release(self, inst: Instance) -> None:
        with self._lock:
            if inst.released:
                return
            inst.released = True
        if inst.tier in LOCAL_TIERS and self.cache is not None:
            try:
                self.cache.release(inst.model, inst.tier, pid=inst.process.pid)
            except Exception:  # the copy may have been evicted by hand meanwhile
                log.exception("releasing the %s copy of %s failed", inst.tier, inst.model)

    # --------------------------------------------------------------------------------------------- migrate

    def refresh(self, inst: Instance) -> int:
        """Ask the worker now how many requests it runs or queues (the watcher's count may be a second old)."""
        if inst.state in ("ready", "draining") and not inst.stopping:
            self._poll_ready(inst)
        return inst.running_requests

    def migrate_out(self, instance_id: str, destination_url: str, timeout: float,
                    ticket: MigrationTicket | None = None) -> MigrationOutcome:
        """Ask an instance's worker to live-migrate every running and waiting request to destination_url (a worker
        of the same model on another node). Never raises for a failed migration: the outcome says what happened,
        and whatever did not move stays on the source worker."""
        inst = self.get(instance_id)
        outcome = MigrationOutcome(inst.instance_id, inst.model, destination_url)
        if inst.worker_url is None or inst.state not in ("ready", "draining") or inst.stopping:
            return outcome  # still loading (or stopping): it holds no request to move
        started = time.monotonic()
        timeout = max(timeout, 0.1)
        # One deadline for both sides: the worker's moves end (moved, or left running there) the answer margin
        # before ours, so its answer, with what moved and what did not, comes before we stop waiting and stop it.
        moves_timeout = timeout - drain_answer_margin(timeout)
        # Shares this manager's HTTP client (not closed here).
        worker = WorkerClient(inst.worker_url, self.key or "", client=self._http)
        try:
            order = MigrateRequest(destination_url=destination_url, timeout_seconds=moves_timeout, ticket=ticket)
            result = worker.migrate_all(order, timeout=timeout)
        except WorkerError as exc:
            outcome.error = f"worker {inst.worker_url} did not migrate its requests: {exc}"
        else:
            outcome.migrated, outcome.failed = result.migrated, result.failed
        outcome.seconds = time.monotonic() - started
        self._log_migration(outcome)
        return outcome

    @staticmethod
    def _log_migration(outcome: MigrationOutcome) -> None:
        if outcome.error:
            log.warning("instance %s (%s): migration to %s failed after %.2f s: %s; its requests resume from their "
                        "tokens through the gateway", outcome.instance_id, outcome.model, outcome.destination_url,
                        outcome.seconds, outcome.error)
            return
        log.info("instance %s (%s): %d requests live-migrated to %s in %.2f s%s", outcome.instance_id, outcome.model,
                 len(outcome.migrated), outcome.destination_url, outcome.seconds,
                 f"; {len(outcome.failed)} not moved (they resume from their tokens): "
                 + "; ".join(f"{f.request_id}: {f.error}" for f in outcome.failed)
                 if outcome.failed else "")

    # -------------------------------------------------------------------------------------------------- stop

    def _stop_signal(self, inst: Instance) -> signal.Signals:
        """What _terminate sends the worker: SIGTERM; a tensor-parallel instance's mpirun mpirun_stop_signal, a
        spanning one's srun SPANNING_STOP_SIGNAL (either forwards it to every rank)."""
        if inst.nodes > 1:
            return SPANNING_STOP_SIGNAL
        return mpirun_stop_signal(self.config) if inst.ranks > 1 else signal.SIGTERM

    def _terminate(self, inst: Instance) -> None:
        inst.stopping = True
        if inst.nodes > 1:  # srun forwards it to every rank: the lead shuts down and stops the followers
            if inst.process.poll() is None:
                inst.process.send_signal(self._stop_signal(inst))
            inst.wake.set()
            return
        if not inst.children and inst.process.poll() is None:
            # mpirun may exit before its ranks (on SIGTERM: mpirun_stop_signal), a worker may leave a hung engine
            # process behind: the watcher and stop() wait for them too.
            inst.children = processes(descendants(inst.process.pid))
        if inst.process.poll() is None:
            inst.process.send_signal(self._stop_signal(inst))
        inst.wake.set()

    @staticmethod
    def _kill(inst: Instance) -> None:
        """SIGKILL the worker and every process under it (a vLLM engine core, hpcllm's model process: an orphan
        would keep the GPU memory the next instance gets); a tensor-parallel one's mpirun and every rank under it; a
        spanning one's ranks on every node through srun (SIGTERM to srun SIGKILLs its step's tasks), then srun."""
        if inst.nodes > 1:
            if inst.process.poll() is None:
                inst.process.send_signal(signal.SIGTERM)
                if not exited_within(inst.process, 10):
                    inst.process.kill()
            return
        pids = [proc.pid for proc in running(inst.children)]
        if inst.process.poll() is None:  # not reaped: its pid is still its own (once reaped, another's to reuse)
            pids = [inst.process.pid, *descendants(inst.process.pid), *pids]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, instance_id: str, timeout: float | None = None) -> Instance:
        """Stop an instance (its stop signal, _stop_signal; SIGKILL after the timeout) and forget it; returns it in
        its final state."""
        inst = self.get(instance_id)
        if inst.active:
            self._set_state(inst, "draining")
        self._terminate(inst)
        timeout = self.config.node.worker_stop_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not (exited_within(inst.process, timeout) and self._gone(inst.children, deadline)):
            log.warning("instance %s did not stop within %.0f s of %s: SIGKILL", instance_id, timeout,
                        self._stop_signal(inst).name)
            self._kill(inst)
            self._await_kill(inst)
        inst.wake.set()  # the process is gone: the watcher records the exit and releases the copy now
        if not self._still_running(inst):  # else one outlived its SIGKILL: the watcher ends once it is gone
            inst.done.wait(timeout=10)
        with self._lock:
            if self._instances.pop(instance_id, None) is not None:  # not already by a stop beside this one
                inst.removed_in = self._new_version()
            if not inst.done.is_set():
                # A process outlived its SIGKILL (the watcher frees the GPUs once it is gone), or the watcher still
                # re-hashes the copies a failed load may have found corrupt (_replace_corrupt_copy): it forgets the
                # instance when it ends.
                self._leftovers[instance_id] = inst
        self.on_change()  # the heartbeat it wakes starts a spare for the freed slot (ensure_spares)
        return inst

    @staticmethod
    def _gone(recorded: list[Process], deadline: float) -> bool:
        """Whether the recorded processes end by the deadline (monotonic)."""
        while running(recorded) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not running(recorded)

    def _await_kill(self, inst: Instance) -> None:
        """KILL_WAIT_SECONDS for what the SIGKILL hit to end, then an error naming what did not."""
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        if not (exited_within(inst.process, KILL_WAIT_SECONDS) and self._gone(inst.children, deadline)):
            self._log_unkilled(inst)

    @staticmethod
    def _log_unkilled(inst: Instance) -> None:
        pids = [proc.pid for proc in running(inst.children)]
        if inst.process.poll() is None:
            pids.insert(0, inst.process.pid)
        log.error("instance %s: process(es) %s still run %.0f s after SIGKILL (uninterruptible sleep: a hung GPU "
                  "driver or filesystem; see their state in /proc/PID/stat): their GPUs stay in use until they end",
                  inst.instance_id, ", ".join(map(str, pids)), KILL_WAIT_SECONDS)

    def stop_all(self, timeout: float | None = None) -> None:
        self.retire_spares()
        threads = [threading.Thread(target=self.stop, args=(inst.instance_id, timeout), daemon=True)
                   for inst in self.instances()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        self.retire_spares()
        self._http.close()

