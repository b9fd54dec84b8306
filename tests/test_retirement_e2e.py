"""Retirement of controller-made allocations before their walltime, end to end on the real dev cluster
(docs/controller.md, "Retirement": make before break).

A real `hpcllm controller` with allocate_on_demand, a gunicorn `hpcllm gateway`, the official `openai` client. Two
models, each a small Llama (devmodels "small": 1024 positions, 4-20 ms a token here, so a 960-token stream outlasts
a hand-over; the tiny one streams its whole context in 1-2 s) with min_instances = max_instances = 1 and
cpu_slots_per_node = 1, make the controller submit two node-agent allocations itself, one per model, each with a
2-minute walltime, so it knows their walltime ends. Their retirement times are checked by hand against the
autoscaler's rule: the latest time at most retire_lead_seconds before the walltime end that is
retire_stagger_seconds away from the other allocation's retirement. They start within the stagger, so the one whose
time was set second retires a stagger before the other.

The first to retire holds its model's only instance. At its retire_at it serves on while the controller starts a
replacement elsewhere (a third allocation, C: the retiring node takes no new instance); long greedy streams start on
the retiring instance while the replacement loads (a new one every few seconds, three at most at once). Once the
replacement is ready the allocation drains: the running streams live-migrate into the replacement (the agent's
migrate-out) and the allocation is cancelled once empty. Checks: `hpcllm status` showed the phase ("retiring,
replacement starting") before the drain; every stream goes on without error to transformers' greedy text; the
gateway followed as many live migrations as the controller moved (at least one) and resumed none; the controller
counted one `retire` move with outcome `migrated`, into the replacement; the Slurm job ended CANCELLED (not TIMEOUT)
long before its walltime and the controller records it ended for `walltime`; the two allocations never drained at
the same time; a request after the retirement is served. Everything started here (processes, Slurm jobs) is stopped
at the end, also on failure.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (HPCLLM, answers, clean_up_e2e, free_port, node_key_in, start_logged, stop_process,
                         transformers_greedy, wait_for, write_e2e_config)
from e2e_helpers import admin_status as e2e_admin_status
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend

pytestmark = pytest.mark.slurm

SECRET = "retire-e2e-secret"
ADMIN = "retire-e2e-admin"
USER_KEY = "retire-e2e-user"
# Unique: the jobs the controller submits are named after them (hpcllm-pool-<model>).
MODELS = (f"small-llama-ret{os.getpid()}a", f"small-llama-ret{os.getpid()}b")
PROMPT = "hello world"
# The model's context is 1024 positions: 960 tokens last ~4-60 s on this 2-core host, depending on its load (600,
# before the CPU fast path, once ended before the move on a quiet host: 530 tokens were out by then). Greedy from
# PROMPT, the model's first eos is its 1000th token. The stream starts when the replacement's instance is loading.
MAX_TOKENS = 960
WALLTIME = 120  # slurm.time "00:02:00" (Slurm counts whole minutes)
RETIRE_LEAD = 15.0
RETIRE_STAGGER = 40.0
# The drain deadline is walltime end - slurm.signal_seconds (0 here) - DRAIN: the first to retire has about
# RETIRE_LEAD + RETIRE_STAGGER - DRAIN = 45 s for its replacement (Slurm start, agent, load: 3-28 s here). The
# second has RETIRE_LEAD - DRAIN = 5 s: it drains without one at its deadline, after this test's checks of the first.
DRAIN = 10.0
STREAM_EVERY = 4.0  # seconds between the streams' starts on the retiring instance
MAX_STREAMS = 3  # at once


def write_config(root: Path, controller_port: int, gateway_port: int) -> Path:
    # worker.cpu_threads = 1: one torch thread per worker, as a 1-CPU Slurm task bound to its CPU would get. The dev
    # cluster binds nothing (TaskPlugin=task/none): each agent sees both cores of this host and would give its
    # worker two threads, and two-thread workers beside each other and other tests' processes spin-wait each other
    # down to ~100 ms a token.
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"ret{os.getpid()}",
        gateway_port=gateway_port, user_key=USER_KEY, slurm={"time": "00:02:00", "signal_seconds": 0},
        worker={"cpu_threads": 1},
        # No background read sweep (probe reads on each allocation's node) and no spare workers: the controller
        # starts the model as each agent registers (its spare, still importing, took it) and a replacement spare
        # imported torch twice beside the hand-over's streams. The workers start fresh; nothing here checks either.
        node={"migrate_timeout_seconds": 20, "worker_stop_timeout_seconds": 10, "read_sweep": False,
              "spare_workers": 0},
        controller={"allocate_on_demand": True, "allocation_start_estimate_seconds": 5.0, "tick_seconds": 0.5,
                    "cpu_slots_per_node": 1, "retire_lead_seconds": RETIRE_LEAD,
                    "retire_stagger_seconds": RETIRE_STAGGER, "drain_seconds": DRAIN,
                    # The replacement must not evict the other model's idle instance (placement would: cheaper than
                    # an allocation) but wait for an allocation of its own.
                    "min_residency_seconds": 600})


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


def samples(url: str, name: str) -> list:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def model_total(url: str, name: str, model: str, **labels: str) -> float:
    """Sum of a counter's samples of one model (label model_name, on every service) matching labels."""
    return sum(s.value for s in samples(url, name)
               if s.labels.get("model_name") == model
               and all(s.labels.get(k) == v for k, v in labels.items()))


def running_requests(instance: dict, controller_url: str) -> int:
    """Asked of the worker itself (the controller's heartbeat view lags by a second), with its node's key (the
    controller's allocations register with their own tokens)."""
    key = node_key_in(admin_status(controller_url), instance["node_id"], SECRET)
    ready = httpx.get(f"{instance['worker_url']}/ready", headers={SECRET_HEADER: key}, timeout=5).json()
    return int(ready.get("running_requests") or 0)


class StatusMonitor(threading.Thread):
    """Polls the controller's admin status 4 times a second: when each allocation was first seen in its retiring
    phase and first seen draining (or past it), which were draining together, the last status seen (for failure
    messages)."""

    def __init__(self, controller_url: str):
        super().__init__(daemon=True)
        self.controller_url = controller_url
        self.stop = threading.Event()
        self.draining_together: list[tuple[float, list[str]]] = []
        self.retired_seen: dict[str, float] = {}  # job -> when first seen draining (or past it) for its walltime
        self.retiring_seen: dict[str, float] = {}  # job -> when first seen serving in its retiring phase
        self.last: dict = {}

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                status = admin_status(self.controller_url)
            except (httpx.HTTPError, ValueError):
                continue
            self.last = status
            for alloc in status["allocations"]:
                if alloc["phase"] == "retiring, replacement starting":
                    self.retiring_seen.setdefault(alloc["job_id"], status["now"])
                if alloc["reason"] == "walltime" or alloc["state"] == "draining":
                    self.retired_seen.setdefault(alloc["job_id"], status["now"])
            draining = sorted(a["job_id"] for a in status["allocations"] if a["state"] == "draining")
            if len(draining) > 1:
                self.draining_together.append((status["now"], draining))


def complete(gateway_url: str, model: str, max_tokens: int):
    """One greedy completion through the gateway with the openai client: (text, finish_reason)."""
    import openai

    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=60) as client:
        choice = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                           temperature=0).choices[0]
    return choice.text, choice.finish_reason


class Stream(threading.Thread):
    """One greedy streaming completion through the gateway with the openai client, consumed in the background."""

    def __init__(self, gateway_url: str, model: str, max_tokens: int = MAX_TOKENS):
        super().__init__(daemon=True)
        self.gateway_url, self.model, self.max_tokens = gateway_url, model, max_tokens
        self.text, self.finish, self.chunks, self.error = "", None, 0, None
        self.started = time.time()

    def run(self) -> None:
        import openai

        try:
            with openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key=USER_KEY, max_retries=0,
                               timeout=180) as client:
                for chunk in client.completions.create(model=self.model, prompt=PROMPT, max_tokens=self.max_tokens,
                                                       temperature=0, stream=True):
                    self.text += chunk.choices[0].text
                    self.finish = chunk.choices[0].finish_reason or self.finish
                    self.chunks += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = repr(exc)


@pytest.fixture
def stack(slurm_cluster, small_llama_dir, tmp_path):
    """(gateway_url, controller_url, root, backend): controller + gateway processes, state under /var/tmp (munge
    wants world-searchable parents). At the end: processes stopped, then every job of the model cancelled and
    waited for, logs copied to tmp_path."""
    root = Path(tempfile.mkdtemp(prefix="hpcllm-ret-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_config(root, controller_port, gateway_port)
    backend = CliBackend(load_config(config_path).slurm, command_timeout=30)
    convert(small_llama_dir, root / "models" / "small", progress=False)  # both models serve this checkpoint
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["HPCLLM_CONFIG"] = str(config_path)  # the controller passes it on to the jobs it submits
    controller_url, gateway_url = f"http://127.0.0.1:{controller_port}", f"http://127.0.0.1:{gateway_port}"
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for name, args in (("controller", []), ("gateway", ["--port", str(gateway_port)])):
            log = root / f"{name}.log"
            procs.append((start_logged([HPCLLM, name, "--config", str(config_path), *args], log, env), log))
        for (proc, log), url in zip(procs, (controller_url, gateway_url)):
            wait_for(lambda: answers(f"{url}/health", proc, log), 60, f"{log.stem} to answer /health")
        yield gateway_url, controller_url, root, backend
    finally:
        jobs = set()
        if procs and procs[0][0].poll() is None:
            try:
                jobs = {a["job_id"] for a in admin_status(controller_url)["allocations"]}
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        for proc, _ in reversed(procs):  # the controller stops before its jobs: it submits no replacement
            stop_process(proc)
        names = ",".join(f"hpcllm-pool-{model}" for model in MODELS)
        named = subprocess.run(["squeue", "-h", "-o", "%i", "-n", names], capture_output=True,
                               text=True, timeout=30, env=slurm_cluster.env).stdout.split()
        jobs |= set(named)
        for job in jobs:
            backend.cancel(job)
        try:  # the agents drain and exit (SIGKILL KillWait after SIGTERM) before their folders go
            wait_for(lambda: not any(s.state.is_active for s in backend.statuses(sorted(jobs)).values()), 60,
                     f"jobs {sorted(jobs)} to end")
        except AssertionError as exc:
            print(exc)
        clean_up_e2e(root, tmp_path, f"ret{os.getpid()}")


def test_retirement_hands_over_to_a_replacement_started_first(stack, small_llama_dir):
    gateway_url, controller_url, root, backend = stack
    for model in MODELS:
        deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                              timeout=30, json={"name": model, "source": str(root / "models" / "small"), "gpus": 0,
                                                "min_instances": 1, "max_instances": 1})
        assert deployed.status_code == 201, deployed.text
    monitor = StatusMonitor(controller_url)
    monitor.start()

    # The uninterrupted reference (transformers' greedy generate), computed once the stream is done (earlier, its
    # 5-50 s of CPU would slow the allocations' start on this 2-core host).
    reference: dict = {}

    def compute_reference():
        reference["text"], reference["finish"], reference["tokens"] = transformers_greedy(
            small_llama_dir, PROMPT, MAX_TOKENS)
        reference["short"] = transformers_greedy(small_llama_dir, PROMPT, 12)[:2]

    hf = threading.Thread(target=compute_reference)
    try:
        _run_scenario(gateway_url, controller_url, root, backend, monitor, reference, hf)
    finally:
        monitor.stop.set()
        monitor.join(5)
        if hf.ident is not None:
            hf.join()


def _run_scenario(gateway_url, controller_url, root, backend, monitor, reference, hf):
    # 1. The controller submits one allocation per model (cpu_slots_per_node = 1) and starts each model there. Both
    #    get a retirement time once Slurm says they run.
    def two_ready_with_retire_times():
        status = admin_status(controller_url)
        allocs = [a for a in status["allocations"] if a["model"] in MODELS and a["retire_at"] is not None]
        ready = [i for i in status["instances"] if i["model"] in MODELS and i["state"] == "ready"]
        return (status, allocs, ready) if len(allocs) == 2 and len(ready) == 2 else None

    status, allocs, ready = wait_for(two_ready_with_retire_times, 90,
                                     "two allocations with retirement times, each with a ready instance")
    first, second = sorted(allocs, key=lambda x: x["retire_at"])
    assert set(first["nodes"]).isdisjoint(second["nodes"]), allocs
    node_job = {n["node_id"]: n["slurm_job_id"] for n in status["nodes"]}
    instance_of = {node_job[i["node_id"]]: i for i in ready}
    assert set(instance_of) == {first["job_id"], second["job_id"]}, (ready, status["nodes"])  # one on each
    for alloc in (first, second):
        assert alloc["walltime_end"] == alloc["started_at"] + WALLTIME, alloc  # Slurm's end = start + 2 min

    # 2. Retirement times by hand: the later one keeps its own time (lead before its walltime end); the earlier one
    #    is the latest time a stagger away from it, or its own time when that is earlier.
    assert second["retire_at"] == second["walltime_end"] - RETIRE_LEAD, (first, second)
    assert first["retire_at"] == min(first["walltime_end"] - RETIRE_LEAD, second["retire_at"] - RETIRE_STAGGER), \
        (first, second)
    assert first["retire_at"] > first["started_at"] + 10, first  # it served for a while first

    # 3. At its retire_at the first serves on while a replacement of its model (its only instance) starts elsewhere;
    #    a long greedy stream starts on the retiring instance while the replacement loads.
    retiring = instance_of[first["job_id"]]
    model = retiring["model"]
    # Each gateway worker loads the model's tokenizer on its first request (seconds on a busy host): done now, by a
    # few concurrent requests, so that the stream below is routed within milliseconds of its start.
    warm_ups = [threading.Thread(target=complete, args=(gateway_url, model, 1)) for _ in range(6)]
    for thread in warm_ups:
        thread.start()
    for thread in warm_ups:
        thread.join(60)
    assert time.time() < first["retire_at"], "the warm-up ended after the retirement began (the host is very slow)"

    def replacement_loading():
        status = admin_status(controller_url)
        jobs = {n["node_id"]: n["slurm_job_id"] for n in status["nodes"]}
        return [i for i in status["instances"] if i["model"] == model and i["state"] in ("loading", "ready")
                and jobs.get(i["node_id"]) not in (first["job_id"], second["job_id"])]

    [replacement] = wait_for(replacement_loading, first["retire_at"] - time.time() + 40,
                             "the replacement's instance to start", interval=0.1)
    assert replacement["state"] == "loading", f"the replacement was ready before the stream started: {replacement}"
    job = first["job_id"]

    def drained() -> bool:
        alloc = next(a for a in admin_status(controller_url)["allocations"] if a["job_id"] == job)
        return alloc["state"] != "running"

    # Streams on the retiring instance, a new one every STREAM_EVERY seconds (MAX_STREAMS at most at once, a new one
    # at once when none runs), until the allocation drains: whenever the replacement gets ready, a young stream runs
    # there with most of its tokens to go. (A stream near its end can finish on the source while its move
    # re-prefills on the destination: the move then counts as idle. With one stream at a time this test's second
    # run on a loaded host did that: the stream, started as the replacement began loading, was at its last tokens
    # 25 s later when the replacement was ready.)
    streams: list[Stream] = []
    while not drained():
        assert time.time() < first["walltime_end"], f"{job} never drained: {monitor.last}"
        alive = sum(s.is_alive() for s in streams)
        due = not streams or time.time() - streams[-1].started >= STREAM_EVERY
        if alive == 0 or (due and alive < MAX_STREAMS):
            stream = Stream(gateway_url, model)
            stream.start()
            streams.append(stream)
            wait_for(lambda: stream.chunks or stream.error, 30, "the stream's first chunk", interval=0.05)
            assert stream.error is None, stream.error
            if len(streams) == 1:
                assert running_requests(retiring, controller_url) == 1, "the stream did not go to the retiring instance"
        time.sleep(0.2)
    # 4. The hand-over: once the replacement was ready the allocation drained and its streams moved into it live.
    for stream in streams:
        stream.join(120)
        assert not stream.is_alive(), "a stream did not finish"
        assert stream.error is None, stream.error  # the client saw no break
        assert stream.finish == "length", stream.finish
    hf.start()
    assert job in monitor.retiring_seen and job in monitor.retired_seen, f"{job}: {monitor.last}"
    assert first["retire_at"] <= monitor.retiring_seen[job] < monitor.retired_seen[job], (monitor.retiring_seen,
                                                                                          monitor.retired_seen)

    # The stream can end on the destination before the controller's migrate-out call returns and counts the move.
    wait_for(lambda: model_total(controller_url, "hpcllm_controller_migrations_total", model, trigger="retire",
                                 outcome="migrated"), 30, "the controller to count the retirement's move")
    moved = model_total(controller_url, "hpcllm_controller_migrated_requests_total", model, trigger="retire")
    migrations = model_total(gateway_url, "hpcllm_request_migrations_total", model)
    controller_log = (root / "controller.log").read_text()
    assert moved >= 1 and migrations == moved, \
        f"controller moved {moved}, gateway followed {migrations}; controller log:\n{controller_log[-4000:]}"
    assert model_total(gateway_url, "hpcllm_request_resumes_total", model) == 0
    assert model_total(gateway_url, "hpcllm_migration_pause_seconds_count", model) == moved  # a hand-over each
    assert model_total(controller_url, "hpcllm_controller_migrations_total", model, trigger="retire",
                       outcome="migrated") == 1
    assert model_total(controller_url, "hpcllm_controller_migrations_total", model) == 1  # no other move
    # Seen while its start call was in flight, the replacement had its placement's reservation id ("reserved:..."):
    # its own id is the one on its node now.
    [replacement_id] = [i["instance_id"] for i in admin_status(controller_url)["instances"]
                        if i["model"] == model and i["node_id"] == replacement["node_id"]]
    assert (f"moved instance {retiring['instance_id']} ({model}) off {retiring['node_id']} for retire: migrated, "
            f"{moved:.0f} requests live-migrated to {replacement_id}") in controller_log, \
        controller_log[-4000:]

    # 5. The retired job is cancelled once empty, long before its walltime; the controller knows why it ended.
    def retired_ended():
        allocs = {a["job_id"]: a for a in admin_status(controller_url)["allocations"]}
        return allocs[job] if allocs[job]["state"] == "ended" else None

    ended = wait_for(retired_ended, 60, f"allocation {job} to end")
    assert ended["reason"] == "walltime", ended  # retired ahead of its walltime (not idle, not lost)
    slurm_status = backend.statuses([job])[job]
    assert slurm_status.raw_state == "CANCELLED", slurm_status  # scancel'd by the controller: not TIMEOUT
    assert slurm_status.end_time is not None and slurm_status.end_time < first["walltime_end"] - DRAIN, slurm_status
    assert not monitor.draining_together, monitor.draining_together
    # The other one served on until its own retirement (which may have begun by now).
    assert monitor.retired_seen.get(second["job_id"], second["retire_at"]) >= second["retire_at"], monitor.retired_seen

    # 6. The model keeps serving on the replacement, and every text equals transformers' greedy generate: nothing
    #    lost or repeated across the move.
    after = complete(gateway_url, model, 12)
    hf.join()
    assert reference["tokens"] == MAX_TOKENS and reference["finish"] == "length"  # no eos before MAX_TOKENS
    for stream in streams:
        assert stream.text == reference["text"]
    assert after == reference["short"]
