"""The node agent daemon: one per node, inside a Slurm job (docs/node-agent.md).

Life: the tiers' rates (saved on this node by an earlier agent, else measured now: probes.py) -> serve the agent API
(app.py) -> start the spare workers -> register with the controller -> heartbeat (instances + cache lists, new tier
rates; 404 unknown_node means register again, 409 agent_replaced drain and exit), with the tier probes (when saved
ones were used) and the read sweep (unless a recent one was saved) in the background once the node is idle
(read_sweep.py), until the drain signal or SIGTERM -> drain (no new instances, tell the controller the instances
are draining, live-migrate their running requests to instances on other nodes the controller names, within
node.migrate_timeout_seconds, stop the workers gracefully, a last heartbeat with nothing left) -> exit 0. A
repeated signal is part of the same drain.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import httpx

from hpcllm.config import Config
from hpcllm.controller.errors import AgentReplaced
from hpcllm.controller.protocol import (
    CacheEntry,
    Heartbeat,
    InstanceInfo,
    MigrationTarget,
    MigrationTargetRequest,
    HeartbeatResponse,
    ModelList,
    NodeRegistration,
    RegisterResponse,
    TierInfo,
    Tiers,
)
from hpcllm.credentials import TOKEN_HEADER, MigrationTicket, check_ticket
from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.httpkit.auth import secret_headers
from hpcllm.httpkit.client import check_url, error_of, internal_client, retry_after_s
from hpcllm.httpkit.server import InternalServer
from hpcllm.node.cache import CacheError
from hpcllm.node.gpus import GpuInventory, detect_gpus
from hpcllm.node.job_end import read_job_end
from hpcllm.node.probes import PROBE_FORMAT, ProbeResult, TierMeasurements, measure_tiers, sweep_read_settings
from hpcllm.node.read_sweep import (
    BackgroundMeasurements,
    IdleGate,
    Measurement,
    SavedResult,
    SavedSweep,
    measurement_key,
    saved_result_path,
)
from hpcllm.node.protocol import MAX_REQUEST_BYTES, MigratedOut, StartInstance
from hpcllm.node.workers import MigrationOutcome, WorkerManager
from hpcllm.node.identity import check_node_local, expand_node_pattern, node_name, slurm_job_id
from hpcllm.slurm.base import drain_signal, ignore_drain_signal
from hpcllm.slurm.errors import SlurmError
from hpcllm.store.tuning import ALLOWED_MODES, ReadTuning, SweepGate

log = logging.getLogger(__name__)

CONTROLLER_URL_ENV = "HPCLLM_CONTROLLER_URL"
GB = 1e9
# Tier probes in the background are taken again when a start began during them, at most this many times.
REMEASURE_TRIES = 3
# squeue reading the job's end runs in the heartbeat thread: at most this long (the node timeout is longer).
JOB_END_READ_TIMEOUT_SECONDS = 10.0


def controller_url_of(config: Config, override: str | None = None) -> str:
    url = override or config.node.controller_url or os.environ.get(CONTROLLER_URL_ENV) or \
        f"{config.internal_http.scheme}://{config.controller.host}:{config.controller.port}"
    return check_url(url, f"the controller URL (--controller-url, node.controller_url or ${CONTROLLER_URL_ENV})")


def _tier(read_gbps: float | None, capacity: int | None = None, scope: str | None = None) -> TierInfo | None:
    if read_gbps is None or read_gbps <= 0:
        return None
    return TierInfo(capacity_bytes=capacity, read_gbps=round(read_gbps, 4), scope=scope)


def load_gbps(probe: ProbeResult | None, tuning: ReadTuning | None, swept_tier: str) -> float | None:
    """The rate a load reads a tier at, for placement: the read sweep's best of the modes a load onto a GPU or into
    a worker's reserved pool reads that tier with, where this node swept it (loads read with those settings:
    several requests in flight, into one model-sized buffer), else the tier probe's one-request-at-a-time read."""
    tuned = tuning.tiers.get(swept_tier) if tuning is not None else None
    best = tuned.fastest(ALLOWED_MODES[(swept_tier, False)]) if tuned is not None else None
    if best is not None:
        return best.gbps
    return probe.read_gbps if probe is not None else None


def make_cache_manager(config: Config, nvme_dir: Path, node: str, job_id: str | None):
    from hpcllm.node.cache import CacheManager

    namespace = expand_node_pattern(config.node.dram_namespace, node, job_id, "node.dram_namespace")
    return CacheManager(nvme_dir, int(config.node.nvme_capacity_gb * GB), int(config.node.dram_capacity_gb * GB),
                        namespace, nvme_scope=config.node.nvme_scope)


class NodeAgent:
    # The background measurements start after the node has been quiet this long (read_sweep.IdleGate).
    read_sweep_quiet_seconds = 5.0

    def __init__(self, config: Config, *, config_path: Path | None = None, controller_url: str | None = None,
                 pinned_model: str | None = None, cache=None, gpus: GpuInventory | None = None,
                 measurements: TierMeasurements | None = None, token: str | None = None,
                 sweep: Callable[[SweepGate], ReadTuning] | None = None,
                 probe: Callable[[bool], TierMeasurements] | None = None):
        self.config = config
        # A node token (allocation or pool; docs/security.md): the agent then never uses the cluster secret, and
        # its API and workers accept the node key the controller hands out at registration.
        self.token = token
        self.config_path = config_path
        self.node_id = node_name()
        self.job_id = slurm_job_id()
        self.controller_url = controller_url_of(config, controller_url)
        self.pinned_model = pinned_model
        self.nvme_dir = Path(expand_node_pattern(str(config.node.nvme_dir), self.node_id, self.job_id,
                                                 "node.nvme_dir"))
        check_node_local(str(config.node.nvme_dir), self.nvme_dir, "node.nvme_dir")
        self.gpus = gpus if gpus is not None else detect_gpus()
        self.cache = cache if cache is not None else make_cache_manager(config, self.nvme_dir, self.node_id,
                                                                       self.job_id)
        run_dir = Path(expand_node_pattern(str(config.paths.state_dir / "node" / "%n-%j"), self.node_id, self.job_id,
                                           "paths.state_dir"))
        self._wake = threading.Event()
        # A model pool's agent runs its pinned instance only (the controller places nothing on a pool node).
        self.workers = WorkerManager(config, run_dir, self.gpus, self.cache, config_path, on_change=self._wake.set,
                                     max_instances=1 if pinned_model is not None else None)
        self.measurements = measurements
        # The tier probes (probes.measure_tiers unless a test gives another; its argument: measure host-to-device)
        # and the read sweep (probes.sweep_read_settings): each reused when saved recently.
        self._probe = probe or self._probe_tiers
        self._sweep_measure = sweep or self._sweep_read_settings
        self.read_tuning: ReadTuning | None = None  # what this agent's workers load with (None: tier defaults)
        self.background: BackgroundMeasurements | None = None  # started after registering, when one is pending
        self._tiers_pending = False  # saved tier rates registered with: probe again once the node is idle
        self._sweep_pending = False
        self._background_stop = threading.Event()
        # The tier rates the controller has (a registration or heartbeat it accepted carried version _rates_sent).
        self._rates_version = 0
        self._rates_sent = -1
        self.state = "starting"
        self.agent_url: str | None = None
        self.registered = False
        self.heartbeat_seconds = config.node.heartbeat_seconds
        self._drain_requested = threading.Event()
        self._drain_lock = threading.Lock()
        self._drained = threading.Event()
        self._server = None
        self._pinned_last_start = 0.0
        # A model pool's Slurm job end as last read (None: no time limit, or never read), when to read it next, and
        # whether the controller takes it (one older than this agent refuses the field).
        self.job_end: float | None = None
        self._job_end_due = 0.0
        self._send_job_end = True
        self._send_instances_version = True  # false once a controller older than the field refused it
        # This process, to the controller: its registration and heartbeats carry it, so that a late heartbeat of the
        # process before a restart is told from this one's (NodeRegistration.agent_process). None once a controller
        # older than the field refused it.
        self.agent_process: str | None = uuid.uuid4().hex
        # To the controller: its node token when it has one, never then the cluster secret.
        credential = {TOKEN_HEADER: token} if token else secret_headers(config.cluster.shared_secret)
        self._http = internal_client(config.internal_http, headers=credential, timeout=10.0)
        if token:  # until it registered, nothing its workers or API accept is known
            self.workers.set_key(None)
        # What the drain's live migrations did (one entry per instance that had requests), for logs and tests.
        self.migrations: list[MigrationOutcome] = []

    # ------------------------------------------------------------------------------------------ measurement

    def measure(self) -> TierMeasurements:
        """The tier probes now (the start path without a fresh saved result), saved for the next agents."""
        started = time.time()
        self.measurements = self._probe(True)
        self._log_tiers("measured")
        self._save_tiers(self.measurements, started)
        return self.measurements

    def _probe_tiers(self, with_h2d: bool) -> TierMeasurements:
        node, gpus = self.config.node, self.gpus.count if with_h2d else 0
        return measure_tiers(self.nvme_dir, self.config.paths.models_dir, node.probe_bytes, node.memcpy_probe_bytes,
                             gpus, gpu_device=self.gpus.names[0] if gpus else None,
                             preexec_fn=ignore_drain_signal(self.config))

    def _log_tiers(self, how: str) -> None:
        m = self.measurements
        log.info("tiers of %s (%s): nvme %s GB/s (%s), sharedfs %s GB/s, dram %s GB/s, h2d %s GB/s; %d GPUs (%s)",
                 self.node_id, how, *(f"{p.read_gbps:.2f}" if p else "-" for p in (m.nvme,)),
                 m.nvme.mode if m.nvme else "-",
                 *(f"{p.read_gbps:.2f}" if p else "-" for p in (m.sharedfs, m.dram, m.h2d)),
                 self.gpus.count, self.gpus.source)

    def saved_tiers(self) -> SavedResult:
        """This node's saved tier probes: of the same folders (and filesystems), probe sizes, first GPU and version."""
        node, models_dir = self.config.node, self.config.paths.models_dir
        path = saved_result_path(self.nvme_dir, node.nvme_scope, self.config.paths.state_dir, self.node_id,
                                "tier-probe.json")
        # The configured NVMe folder, not its expansion: a job-scoped one (/scratch/%j) is new in every job.
        key = {**measurement_key(self.node_id, self.nvme_dir, models_dir, node.probe_bytes, fmt=PROBE_FORMAT),
               "nvme_dir": str(node.nvme_dir), "models_dir": str(models_dir),
               "memcpy_probe_bytes": node.memcpy_probe_bytes,
               "h2d_gpu": self.gpus.names[0] if self.gpus.count else None}
        return SavedResult(path, key, node.probe_max_age_seconds, what="tier probes", field="tiers",
                           max_age_key="node.probe_max_age_seconds", again="probing the tiers at start",
                           decode=self._registrable_tiers, encode=TierMeasurements.to_dict)

    def _registrable_tiers(self, data: dict) -> TierMeasurements:
        """Saved tier rates the controller takes (a pydantic ValidationError, a ValueError, for one it would not)."""
        measured = TierMeasurements.from_dict(data)
        self.rates(measured)
        return measured

    def prepare_tiers(self) -> bool:
        """The tiers' rates to register with: a fresh saved measurement at once (probed again in the background once
        the node is idle), else the probes now. True when they were probed now."""
        try:  # the probe would make it: the keys of saved results name its filesystem (a job's scratch is new)
            self.nvme_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot make the NVMe folder %s: %s", self.nvme_dir, exc)
        saved = self.saved_tiers().load()
        if saved is None:
            self.measure()
            return True
        self.measurements = saved
        self._tiers_pending = True
        self._log_tiers("saved by an earlier agent")
        return False

    def _save_tiers(self, measured: TierMeasurements, measured_at: float) -> None:
        saved = self.saved_tiers()
        try:
            saved.save(measured, measured_at)
        except OSError as exc:
            log.warning("cannot save the tier probes in %s (%s): the next agent probes at start", saved.path, exc)

    def _remeasure_tiers(self, gate: SweepGate) -> TierMeasurements:
        """The tier probes again once the node is idle, again when a start began during them. Host-to-device only
        while no worker holds a GPU (the probe's CUDA context and copy would take its memory and PCIe bandwidth)."""
        for _ in range(REMEASURE_TRIES):
            token = gate.wait()
            measured = self._probe(not self.workers.gpus_in_use())
            if not gate.disturbed(token):
                break
            log.info("a start began during the tier probes: probing again")
        return measured

    def _tiers_remeasured(self, measured: TierMeasurements, measured_at: float) -> None:
        self.measurements = measured.keeping(self.measurements or TierMeasurements())  # a skipped probe: kept
        self._log_tiers("measured again in the background")
        self._save_tiers(self.measurements, measured_at)
        self._rates_changed()

    def saved_sweep(self) -> SavedSweep:
        node = self.config.node
        path = saved_result_path(self.nvme_dir, node.nvme_scope, self.config.paths.state_dir, self.node_id)
        key = measurement_key(self.node_id, self.nvme_dir, self.config.paths.models_dir, node.probe_bytes)
        return SavedSweep(path, key, node.read_sweep_max_age_seconds)

    def prepare_read_settings(self) -> None:
        """A fresh saved sweep: workers load with it from the start. Otherwise they load with the tier defaults
        until the background sweep (start_background_measurements, after registering) writes its result."""
        if not self.config.node.read_sweep:
            return
        saved = self.saved_sweep().load()
        if saved is not None and saved.tiers:
            self.use_read_tuning(saved)
            return
        self.workers.expect_read_tuning().unlink(missing_ok=True)  # an earlier agent's file of this job: re-measured
        self._sweep_pending = True

    def use_read_tuning(self, tuning: ReadTuning) -> None:
        self.read_tuning = tuning
        self.workers.set_read_tuning(tuning)

    def start_background_measurements(self) -> BackgroundMeasurements | None:
        """The pending measurements (tier probes, then the read sweep) in a background thread, yielding to loads;
        never before registering (cold-start path)."""
        steps = []
        if self._tiers_pending:
            steps.append(Measurement("tier probes", self._remeasure_tiers, self._tiers_remeasured))
        if self._sweep_pending:
            steps.append(Measurement("read sweep", self._sweep_measure, self._sweep_finished))
        if not steps or self._background_stop.is_set():
            return None
        self._tiers_pending = self._sweep_pending = False
        gate = IdleGate(self.workers.busy, lambda: self.workers.starts, self._background_stop,
                        quiet_seconds=self.read_sweep_quiet_seconds)
        self.background = BackgroundMeasurements(steps, gate)
        self.background.start()
        return self.background

    def _sweep_read_settings(self, gate: SweepGate) -> ReadTuning:
        return sweep_read_settings(self.nvme_dir, self.config.paths.models_dir, self.config.node.probe_bytes, gate)

    def _sweep_finished(self, tuning: ReadTuning, measured_at: float) -> None:
        if not tuning.tiers:
            log.info("the read sweep measured no tier: loads keep the tier defaults")
            return  # the next agent tries again
        self.use_read_tuning(tuning)
        self._rates_changed()  # placement now counts with the rates its loads read at
        saved = self.saved_sweep()
        try:
            saved.save(tuning, measured_at)
            log.info("read sweep saved in %s for the next agents on %s", saved.path, self.node_id)
        except OSError as exc:
            log.warning("cannot save the read sweep in %s (%s): the next agent sweeps again", saved.path, exc)

    def _nvme_capacity(self, cached: list[CacheEntry]) -> int:
        """Free space plus the NVMe copies `cached` (cache_entries: none where the cache cannot be read)."""
        configured = int(self.config.node.nvme_capacity_gb * GB)
        try:
            stat = os.statvfs(self.nvme_dir)
            return min(configured, stat.f_bavail * stat.f_frsize + sum(c.bytes for c in cached if c.tier == "nvme"))
        except OSError:
            return configured

    def cache_entries(self) -> list[CacheEntry]:
        if self.cache is None:
            return []
        try:
            copies = self.cache.list()
        except CacheError as exc:  # its disk gone read-only or failing: loads read the origin, so report no copies
            log.warning("reporting no cached copies: %s", exc)
            return []
        return [CacheEntry(model=c.model, tier=c.tier, bytes=c.bytes, verified=c.verified, last_used=c.last_used,
                           tensor_parallel=c.tensor_parallel, rank=c.rank)
                for c in copies]

    def instance_listing(self) -> tuple[list[InstanceInfo], int]:
        """The instances this agent runs, and the version of that list (WorkerManager.version); a tensor-parallel
        one's ranks all run on this node (mpirun here)."""
        infos, version = self.workers.listing()
        return [info if info.rank_nodes else info.model_copy(update={"rank_nodes": [self.node_id] *
                                                                     info.tensor_parallel})
                for info in infos], version

    def rates(self, measured: TierMeasurements | None = None,
              cached: list[CacheEntry] | None = None) -> tuple[Tiers, float | None]:
        """(tiers, h2d_gbps) as the controller places with them: the tier probes' figures (`measured`, else this
        agent's), the file tiers' read rates from the read sweep where there is one (load_gbps). `cached`: the
        copies the same message reports (read once), else read here."""
        m = measured or self.measurements or TierMeasurements()
        node, tuning = self.config.node, self.read_tuning
        nvme_capacity = self._nvme_capacity(self.cache_entries() if cached is None else cached)
        tiers = Tiers(dram=_tier(m.dram and m.dram.read_gbps, int(node.dram_capacity_gb * GB)),
                      nvme=_tier(load_gbps(m.nvme, tuning, "disk"), nvme_capacity, node.nvme_scope),
                      sharedfs=_tier(load_gbps(m.sharedfs, tuning, "sharedfs")))
        return tiers, round(m.h2d.read_gbps, 4) if m.h2d else None

    def _rates_changed(self) -> None:
        """New tier rates: the next heartbeat carries them (sent now)."""
        self._rates_version += 1
        self.wake_heartbeat()

    def registration(self) -> NodeRegistration:
        cached = self.cache_entries()
        tiers, h2d_gbps = self.rates(cached=cached)
        return NodeRegistration(node_id=self.node_id, agent_url=self.agent_url or "http://unbound",
                                slurm_job_id=self.job_id, job_scoped=self.config.node.nvme_scope == "job",
                                gpus=self.gpus.count, tiers=tiers, h2d_gbps=h2d_gbps, cached=cached,
                                pool_model=self.pinned_model, agent_process=self.agent_process)

    # ----------------------------------------------------------------------------------------------- server

    def start_server(self, app) -> str:
        host, port = self.config.node.listen_host, self.config.node.port
        try:
            self._server = InternalServer(app, host, port, http=self.config.internal_http,
                                          threads=self.config.node.threads, name="node agent",
                                          max_request_bytes=MAX_REQUEST_BYTES)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; change node.listen_host / node.port") from None
        advertised = host if host not in ("0.0.0.0", "::", "") else socket.getfqdn()
        self.agent_url = f"{self._server.scheme}://{advertised}:{self._server.port}"
        self._server.start()
        log.info("node agent %s listening on %s", self.node_id, self.agent_url)
        return self.agent_url

    # ----------------------------------------------------------------------------------- controller calls

    def _post(self, path: str, body, **dump) -> httpx.Response:
        return self._http.post(f"{self.controller_url}{path}", content=body.model_dump_json(**dump),
                               headers={"Content-Type": "application/json"})

    def register(self) -> bool:
        """Register, retrying with back-off until the controller accepts (or a drain begins). True when registered."""
        delay = 0.5
        while not self._drain_requested.is_set():
            try:
                version = self._rates_version
                resp = self._post("/v1/internal/nodes/register", self.registration(),
                                  exclude={"agent_process"} if self.agent_process is None else None)
                if resp.status_code == 400 and self.agent_process is not None \
                        and self._refuses(resp, ("agent_process",)):
                    log.warning("the controller %s refused this agent's process id (%s): a late heartbeat of an "
                                "agent process before this one may show its instances for a heartbeat period",
                                self.controller_url, error_of(resp)[1])
                    self.agent_process = None
                    continue
                if resp.status_code == 200:
                    answer = RegisterResponse.model_validate(resp.json())
                    self._rates_sent = version
                    self.heartbeat_seconds = answer.heartbeat_seconds or self.heartbeat_seconds
                    if self.token:
                        if not answer.node_key:
                            raise ConfigError(f"the controller {self.controller_url} accepted the token but sent no "
                                              f"node key: it is older than this agent")
                        self.workers.set_key(answer.node_key)
                    self.registered = True
                    log.info("registered %s with the controller %s", self.node_id, self.controller_url)
                    return True
                if resp.status_code in (400, 401, 403, 422):  # our mistake or a wrong credential: retrying won't help
                    raise ConfigError(f"the controller {self.controller_url} refused the registration: "
                                      f"HTTP {resp.status_code} {error_of(resp)[1]}")
                log.warning("controller %s answered HTTP %d to the registration (%s); retrying in %.1f s",
                            self.controller_url, resp.status_code, error_of(resp)[1], delay)
            except httpx.HTTPError as exc:
                log.warning("controller %s unreachable (%s); retrying in %.1f s", self.controller_url, exc, delay)
            self._drain_requested.wait(delay)
            delay = min(delay * 2, 10.0)
        return False

    def _give_up(self, reason: str, message: str) -> bool:
        """The controller counts no heartbeat of this agent again: drain and exit (telling it nothing more) rather
        than hold the job's workers for nothing. False: the failed heartbeat's answer."""
        log.error("%s; this agent stops its workers and exits", message)
        self.registered = False
        self.request_drain(reason)
        return False

    def heartbeat(self) -> bool:
        """One heartbeat; registers again when the controller does not know this node. False if it failed."""
        version, rates, cached = self._rates_version, {}, self.cache_entries()
        if version != self._rates_sent:  # measured again since the controller last heard: it places with these
            rates = dict(zip(("tiers", "h2d_gbps"), self.rates(cached=cached)))
        job_end = self.job_end if self._send_job_end else None
        instances, instances_version = self.instance_listing()
        instances_version = instances_version if self._send_instances_version else None
        body = Heartbeat(cached=cached, instances=instances, instances_version=instances_version,
                         draining=self.state in ("draining", "stopped"), job_end=job_end,
                         agent_process=self.agent_process, **rates)
        # Without rates, a job end, a version or a process id, none of their fields: a controller older than this
        # agent would refuse them.
        exclude = ({"tiers", "h2d_gbps"} if not rates else set()) | ({"job_end"} if job_end is None else set()) \
            | ({"instances_version"} if instances_version is None else set()) \
            | ({"agent_process"} if self.agent_process is None else set())
        try:
            resp = self._post(f"/v1/internal/nodes/{self.node_id}/heartbeat", body, exclude=exclude or None)
        except httpx.HTTPError as exc:
            log.warning("heartbeat to %s failed: %s", self.controller_url, exc)
            return False
        if resp.status_code == 404:
            log.warning("the controller does not know %s (declared lost, or a new database): registering again",
                        self.node_id)
            return self.register()
        if resp.status_code == 401 and not self.token:
            # The cluster secret refused: the controller was restarted with another cluster.shared_secret (a typo, a
            # rotation). Fixing its config fixes this, so the agent keeps its instances and goes on beating.
            log.error("the controller %s refused this agent's cluster secret (%s): check that cluster.shared_secret "
                      "is the same in the controller's config and this node's", self.controller_url,
                      error_of(resp)[1])
            return False
        if resp.status_code == 401:
            # The controller takes this agent's node token no more (a pool token revoked, an allocation's job over):
            # no heartbeat of it counts again and it may not register, so it drains and exits rather than hold its
            # job's GPUs for nothing, beating for ever.
            return self._give_up("credential refused", f"the controller {self.controller_url} refused this agent's "
                                 f"credential ({error_of(resp)[1]})")
        if resp.status_code == AgentReplaced.http_status and error_of(resp)[0].get("code") == AgentReplaced.code:
            # Another `hpcllm node` registered this node after this process (two on one node): none of this one's
            # heartbeats counts any more, so it would keep its workers for nothing. It drains and exits, telling
            # the controller nothing more (its drain's heartbeats would be refused too).
            return self._give_up("replaced by another agent process",
                                 f"another agent process registered node {self.node_id} with the controller "
                                 f"{self.controller_url} after this one (two `hpcllm node` on one node?): "
                                 f"{error_of(resp)[1]}")
        if resp.status_code == 400 and rates and self._refuses(resp, ("tiers", "h2d_gbps")):
            # A controller older than this agent takes no rates in a heartbeat: it keeps the registered ones, and
            # the heartbeat goes again without them (else it fails until the node is declared lost).
            log.warning("the controller %s refused the tier rates measured again (%s): it places with the "
                        "registered ones", self.controller_url, error_of(resp)[1])
            self._rates_sent = version
            return self.heartbeat()
        if resp.status_code == 400 and job_end is not None and self._refuses(resp, ("job_end",)):
            log.warning("the controller %s refused this pool's job end (%s): it cannot hand the pool over before "
                        "the job ends; Slurm's signal drains it", self.controller_url, error_of(resp)[1])
            self._send_job_end = False
            return self.heartbeat()
        if resp.status_code == 400 and instances_version is not None and self._refuses(resp, ("instances_version",)):
            log.warning("the controller %s refused this agent's instance-list version (%s): it tells a heartbeat "
                        "built before one of its starts or stops by time only", self.controller_url,
                        error_of(resp)[1])
            self._send_instances_version = False
            return self.heartbeat()
        if resp.status_code != 200:
            log.warning("heartbeat answered HTTP %d: %s", resp.status_code, resp.text[:300])
            return False
        if rates:
            self._rates_sent = version
        if self.pinned_model is not None:
            self._follow_the_controller(resp)
        return True

    @staticmethod
    def _refuses(resp: httpx.Response, fields: tuple[str, ...]) -> bool:
        """A 400 about one of these heartbeat fields (a controller older than this agent: an unknown field), not
        about anything else of the heartbeat: only then do heartbeats go on without them (the job end: the pool is
        then never handed over; the rates: the controller places with the registered ones)."""
        error, message = error_of(resp)
        return error.get("param") in fields or any(field in message for field in fields)

    def _follow_the_controller(self, resp: httpx.Response) -> None:
        """A model pool's node the controller drains (it retires the pool before its job ends, a replacement ready
        elsewhere): drain - live-migrate the running requests there, stop, exit - as at Slurm's signal."""
        try:
            answer = HeartbeatResponse.model_validate(resp.json())
        except ValueError:  # not the controller's answer (a proxy's page): nothing to follow
            log.warning("the heartbeat's answer is no HeartbeatResponse: %s", resp.text[:300])
            return
        if answer.state == "draining" and self.state == "up":
            self.request_drain("the controller hands this pool over before its Slurm job ends")

    def refresh_job_end(self) -> None:
        """A model pool in a Slurm job: read when the job ends, at most every node.job_end_refresh_seconds (not per
        heartbeat: one squeue call a minute by default). A failure is logged and the last end read is kept (none:
        the controller plans no hand-over; Slurm's signal still drains)."""
        if self.pinned_model is None or self.job_id is None or time.monotonic() < self._job_end_due:
            return
        self._job_end_due = time.monotonic() + self.config.node.job_end_refresh_seconds
        try:
            end = read_job_end(self.job_id, JOB_END_READ_TIMEOUT_SECONDS)
        except SlurmError as exc:
            kept = "no end" if self.job_end is None else f"the end read before, {self.job_end:.0f}"
            log.warning("cannot read when Slurm job %s ends: %s; the controller keeps %s (trying again in %.0f s)",
                        self.job_id, exc, kept, self.config.node.job_end_refresh_seconds)
            return
        if end != self.job_end:
            log.info("Slurm job %s ends %s", self.job_id, "never (no time limit)" if end is None else
                     time.strftime("at %Y-%m-%dT%H:%M:%S%z", time.localtime(end)))
        self.job_end = end

    def _heartbeat_loop(self) -> None:
        while not self._drain_requested.is_set():
            self._wake.wait(self.heartbeat_seconds)
            self._wake.clear()
            if self._drain_requested.is_set():
                return
            try:
                self.beat()
            except Exception:  # one bad beat must not end them all (the controller would declare the node lost)
                log.exception("heartbeat of %s failed; trying again in %.0f s", self.node_id, self.heartbeat_seconds)

    def beat(self) -> None:
        """One turn of the heartbeat thread: the heartbeat before the spares, whose start may fail."""
        self.refresh_job_end()
        self._keep_pinned_model()
        self.heartbeat()
        self.workers.settle_spares()  # a spare that lives through a long load is no quick death if it dies later
        if self.workers.loading():  # not during a load (its imports would compete): the load's end replaces it
            return
        self.workers.ensure_spares()  # one that died while idle (OOM, killed) is replaced before a start needs it

    # ------------------------------------------------------------------------------------------ pinned model

    def _keep_pinned_model(self) -> None:
        """`hpcllm node --model NAME`: keep one instance of NAME (restarted at most every 30 s after a failure)."""
        if self.pinned_model is None or self._drain_requested.is_set():
            return
        mine = [i for i in self.workers.instances() if i.model == self.pinned_model]
        if any(i.active for i in mine) or time.monotonic() - self._pinned_last_start < 30:
            return
        for failed in mine:
            self.workers.stop(failed.instance_id, timeout=1)
        cards = self._deployed_models()
        if cards is None:
            return
        card = next((c for c in cards if c.name == self.pinned_model), None)
        if card is None:
            log.warning("model %r is not deployed on %s: deploy it (hpcllm deploy) to serve it here",
                        self.pinned_model, self.controller_url)
            self._pinned_last_start = time.monotonic()
            return
        free = [g for g in range(self.gpus.count) if g not in self.workers.gpus_in_use()]
        if card.gpus > len(free):
            log.error("model %s needs %d GPUs, this node has %d free", card.name, card.gpus, len(free))
            self._pinned_last_start = time.monotonic()
            return
        self._pinned_last_start = time.monotonic()
        try:
            self.workers.start(StartInstance(model=card.name, source=card.source, gpu_ids=free[:card.gpus],
                                             max_model_len=card.max_model_len, engine=card.engine,
                                             tensor_parallel=card.tensor_parallel, nodes=card.nodes,
                                             lora_adapters=card.lora_adapters))
        except HpcllmError as exc:
            log.error("cannot start pinned model %s: %s", card.name, exc)

    def _deployed_models(self) -> list | None:
        """The controller's deployed models; None (logged with the controller's reason, asked again at the next
        heartbeat) when it cannot be asked or refuses: never taken for "not deployed"."""
        try:
            resp = self._http.get(f"{self.controller_url}/v1/internal/models")
            if resp.status_code == 200:
                return ModelList.model_validate(resp.json()).models
            reason = f"HTTP {resp.status_code} {error_of(resp)[1]}"
        except (httpx.HTTPError, ValueError) as exc:
            reason = str(exc)
        log.warning("cannot read the deployed models from %s: %s", self.controller_url, reason)
        return None

    # ------------------------------------------------------------------------------------------- migration

    def migration_target(self, model: str, deadline: float, instance_id: str | None = None) -> MigrationTarget | None:
        """A ready instance of `model` on another node, as the controller picks it; while the controller starts
        one (202) ask again until the deadline. None when there is none (or the controller cannot be asked)."""
        body = MigrationTargetRequest(model=model, exclude_node=self.node_id, instance_id=instance_id)
        while True:
            try:
                resp = self._post("/v1/internal/migration-target", body)
            except httpx.HTTPError as exc:
                log.warning("cannot ask the controller %s for a migration target: %s", self.controller_url, exc)
                return None
            if resp.status_code == 200:
                return MigrationTarget.model_validate(resp.json())
            if resp.status_code != 202:
                log.warning("no migration target for %s: HTTP %d %s", model, resp.status_code, resp.text[:300])
                return None
            retry = retry_after_s(resp)
            retry = 1.0 if retry is None else retry
            if time.monotonic() + retry >= deadline:
                log.warning("no migration target for %s within node.migrate_timeout_seconds (one is still %s)",
                            model, resp.json().get("status", "starting"))
                return None
            time.sleep(retry)

    def migrate_instance(self, instance_id: str, deadline: float) -> MigrationOutcome | None:
        """Drain step for one instance: ask the controller where its requests go, then have its worker move them.
        None when there was nowhere to go (the gateway then resumes the requests from their tokens)."""
        inst = self.workers.get(instance_id)
        target = self.migration_target(inst.model, deadline, inst.instance_id)
        if target is None:
            log.warning("instance %s (%s): no other instance to migrate its %d requests to; they resume from their "
                        "tokens through the gateway", inst.instance_id, inst.model, inst.running_requests)
            return None
        log.info("instance %s (%s): migrating its requests to %s on %s", inst.instance_id, inst.model,
                 target.instance_id, target.node_id)
        outcome = self.workers.migrate_out(instance_id, target.worker_url, deadline - time.monotonic(),
                                           ticket=target.ticket)
        self.migrations.append(outcome)
        return outcome

    def migrate_running_requests(self) -> None:
        """Live-migrate the requests of every instance that has some, in parallel, within migrate_timeout."""
        deadline = time.monotonic() + self.config.node.migrate_timeout_seconds
        busy = [i for i in self.workers.instances() if i.worker_url and self.workers.refresh(i) > 0]
        if not busy:
            return
        log.info("draining %s: migrating the requests of %d instances (at most %.0f s)", self.node_id, len(busy),
                 self.config.node.migrate_timeout_seconds)
        threads = [threading.Thread(target=self._migrate_quietly, args=(i.instance_id, deadline),
                                    name=f"migrate-{i.instance_id}", daemon=True) for i in busy]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)

    def _migrate_quietly(self, instance_id: str, deadline: float) -> None:
        try:
            self.migrate_instance(instance_id, deadline)
        except Exception:  # a drain must go on to stop the workers whatever one migration runs into
            log.exception("migrating instance %s failed", instance_id)

    def migrate_out(self, instance_id: str, destination_url: str,
                    ticket: MigrationTicket | None = None) -> MigratedOut:
        """The controller's "move this instance" (placement needs its slots): move its requests (to the destination
        its ticket names), then stop it. The ticket must name this instance: the controller issues it for one
        instance's requests, and a ticket for another of the node's instances is refused (403) before anything moves."""
        inst = self.workers.get(instance_id)
        check_ticket(ticket, key=self.workers.key or "", model=inst.model, destination_url=destination_url,
                     source_instance=instance_id)
        if inst.active:
            inst.state = "draining"
            self.wake_heartbeat()  # the controller stops routing to it
        outcome = self.workers.migrate_out(instance_id, destination_url, self.config.node.migrate_timeout_seconds,
                                           ticket=ticket)
        stopped = self.workers.stop(instance_id)
        return MigratedOut(instance_id=instance_id, model=inst.model, destination_url=destination_url,
                           migrated=outcome.migrated, failed=outcome.failed, error=outcome.error,
                           seconds=round(outcome.seconds, 4), state=stopped.state, exit_code=stopped.exit_code)

    # ------------------------------------------------------------------------------------------------ drain

    def wake_heartbeat(self) -> None:
        """Send the next heartbeat now (a cache or instance change the controller should see soon)."""
        self._wake.set()

    def request_drain(self, reason: str = "") -> None:
        """Signal-handler safe: only sets events and a flag; the main thread drains."""
        if not self._drain_requested.is_set():
            log.info("drain requested%s", f" ({reason})" if reason else "")
        # Nothing starts from now on, not even a spare: the signal may come while the main thread is still busy
        # (the start-up probes, the registration's back-off) before it drains.
        self.workers.accepting = False
        self._drain_requested.set()
        self._wake.set()

    def drain(self) -> None:
        """Stop taking instances, tell the controller, stop the workers gracefully, send a final empty heartbeat.
        Idempotent: a second call waits for the first to finish."""
        with self._drain_lock:
            if self._drained.is_set():
                return
            self._drain_requested.set()
            self._background_stop.set()  # the disk is for the drain now; the next agent measures
            self.state = "draining"
            self.workers.accepting = False
            for inst in self.workers.instances():
                if inst.active:
                    inst.state = "draining"
            if self.registered:
                self.heartbeat()  # the controller stops routing to draining instances at once
                if self.config.node.on_preempt == "migrate":
                    self.migrate_running_requests()  # "restart": the gateway resumes them from their tokens
            self.workers.stop_all()
            if self.registered:
                self.heartbeat()  # nothing left: the controller forgets this node's instances
            self.state = "stopped"
            self._drained.set()
            log.info("node agent %s drained", self.node_id)

    # -------------------------------------------------------------------------------------------------- run

    def install_signal_handlers(self) -> None:
        for signum in {signal.SIGTERM, signal.SIGINT, drain_signal(self.config)}:
            signal.signal(signum, lambda num, _frame: self.request_drain(signal.Signals(num).name))

    def check_drain_budget(self) -> None:
        """Warn when a drain cannot finish inside Slurm's signal lead time (then SIGKILL ends it early)."""
        node, lead = self.config.node, self.config.slurm.signal_seconds
        needed = node.migrate_timeout_seconds + node.worker_stop_timeout_seconds
        if self.job_id and lead and needed > lead:
            log.warning("node.migrate_timeout_seconds + node.worker_stop_timeout_seconds = %.0f s exceeds "
                        "slurm.signal_seconds = %d s: a drain at the time limit may be cut short", needed, lead)

    def run(self, app_factory) -> int:
        """Measure (or take saved rates), serve, start spares, register, heartbeat until a drain; returns the exit
        status (0 after a clean drain)."""
        self.install_signal_handlers()
        self.check_drain_budget()
        self.prepare_tiers()  # saved: no probe now, they run again in the background once the node is idle
        self.prepare_read_settings()
        self.start_server(app_factory(self))
        # Spares import while the agent registers: the probes a spare's imports would disturb are done by now (or
        # were not needed), and the first placement follows the registration within a second.
        self.workers.ensure_spares()
        if self.register():
            self.state = "up"
            heartbeats = threading.Thread(target=self._heartbeat_loop, name="heartbeats", daemon=True)
            heartbeats.start()
            self._wake.set()  # first heartbeat (and pinned model) at once
            self.start_background_measurements()  # waits while the first loads run (IdleGate)
        while not self._drain_requested.wait(1.0):
            pass
        self.drain()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        self._background_stop.set()
        if self.background is not None:
            self.background.join(30.0)  # stops before its next configuration; its probe files are removed
        if self._server is not None:
            self._server.stop()
        self.workers.close()
        self._http.close()
