"""Retirement of controller-made allocations before their walltime, end to end on the real dev cluster
(docs/controller.md, "Allocations and autoscaling", autoscaler step 5).

A real `hpcllm controller` with allocate_on_demand, a gunicorn `hpcllm gateway`, the official `openai` client. A
small Llama (devmodels "small": 1024 positions, 4-20 ms a token here, so a 960-token stream outlasts the move; the
tiny one streams its whole context in 1-2 s) with min_instances = max_instances = 2 and cpu_slots_per_node = 1
makes the controller submit two node-agent allocations itself, one after the other (A, then B once A's instance is
ready), each with a 2-minute walltime, so it knows their walltime ends. Their retirement times are checked by hand
against the autoscaler's rule: the latest time at most retire_lead_seconds before the walltime end that is
retire_stagger_seconds away from the other allocation's retirement. B starts well within the stagger after A, so it
retires first, exactly a stagger before A: 65 s after A started (120 - lead 15 - stagger 40).

A long greedy stream runs on B's instance (started 1.5 s before B's retirement; when the tie-break of the route
would send it to A's instance, a ballast stream occupies that one first). At B's retirement the controller drains B,
live-migrates the stream to A's instance (the agent's migrate-out), starts a replacement (a third allocation, C) and
cancels B once it is empty. Checks: the streams go on without error to transformers' greedy text; the gateway
counted one live migration and no resume; the controller counted one `retire` move with outcome `migrated`; B's
Slurm job ended CANCELLED (not TIMEOUT) long before its walltime and the controller records it ended for
`walltime`; A and B never drained at the same time; C's instance becomes ready and a request after the retirement
is served. Everything started here (processes, Slurm jobs) is stopped at the end, also on failure.
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
                         wait_for, write_e2e_config)
from e2e_helpers import admin_status as e2e_admin_status
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.gateway.tests.test_openai_api import hf_greedy
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend

pytestmark = pytest.mark.slurm

SECRET = "retire-e2e-secret"
ADMIN = "retire-e2e-admin"
USER_KEY = "retire-e2e-user"
MODEL = f"small-llama-ret{os.getpid()}"  # unique: the jobs the controller submits are named after it
PROMPT = "hello world"
# The model's context is 1024 positions: 960 tokens last ~4-60 s on this 2-core host, depending on its load (600,
# before the CPU fast path, once ended before the move on a quiet host: 530 tokens were out by then). Greedy from
# PROMPT, the model's first eos is its 1000th token. The stream starts STREAM_LEAD_IN seconds before the
# retirement, a ballast stream (when one is needed) BALLAST_LEAD_IN seconds before it (time for a heartbeat to count
# the ballast).
MAX_TOKENS = 960
STREAM_LEAD_IN = 1.5
BALLAST_LEAD_IN = 3.0
WALLTIME = 120  # slurm.time "00:02:00" (Slurm counts whole minutes)
RETIRE_LEAD = 15.0
RETIRE_STAGGER = 40.0


def write_config(root: Path, controller_port: int, gateway_port: int) -> Path:
    # worker.cpu_threads = 1: one torch thread per worker, as a 1-CPU Slurm task bound to its CPU would get. The dev
    # cluster binds nothing (TaskPlugin=task/none): each agent sees both cores of this host and would give its
    # worker two threads, and two-thread workers beside each other and other tests' processes spin-wait each other
    # down to ~100 ms a token.
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"ret{os.getpid()}",
        gateway_port=gateway_port, user_key=USER_KEY, slurm={"time": "00:02:00", "signal_seconds": 0},
        worker={"cpu_threads": 1},
        node={"migrate_timeout_seconds": 20, "worker_stop_timeout_seconds": 10},
        controller={"allocate_on_demand": True, "allocation_start_estimate_seconds": 5.0, "tick_seconds": 0.5,
                    "cpu_slots_per_node": 1, "retire_lead_seconds": RETIRE_LEAD,
                    "retire_stagger_seconds": RETIRE_STAGGER, "drain_seconds": 60})


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


def samples(url: str, name: str) -> list:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def model_total(url: str, name: str, **labels: str) -> float:
    """Sum of a counter's samples whose labels name MODEL (gateway: model_name, controller: model) and match."""
    return sum(s.value for s in samples(url, name)
               if MODEL in s.labels.values() and all(s.labels.get(k) == v for k, v in labels.items()))


def running_requests(instance: dict, controller_url: str) -> int:
    """Asked of the worker itself (the controller's heartbeat view lags by a second), with its node's key (the
    controller's allocations register with their own tokens)."""
    key = node_key_in(admin_status(controller_url), instance["node_id"], SECRET)
    ready = httpx.get(f"{instance['worker_url']}/ready", headers={SECRET_HEADER: key}, timeout=5).json()
    return int(ready.get("running_requests") or 0)


class StatusMonitor(threading.Thread):
    """Polls the controller's admin status 4 times a second: when each allocation was first seen retiring, which
    were draining together, the last status seen (for failure messages)."""

    def __init__(self, controller_url: str):
        super().__init__(daemon=True)
        self.controller_url = controller_url
        self.stop = threading.Event()
        self.draining_together: list[tuple[float, list[str]]] = []
        self.retired_seen: dict[str, float] = {}  # job -> when first seen draining (or past it) for its walltime
        self.last: dict = {}

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                status = admin_status(self.controller_url)
            except (httpx.HTTPError, ValueError):
                continue
            self.last = status
            for alloc in status["allocations"]:
                if alloc["reason"] == "walltime" or alloc["state"] == "draining":
                    self.retired_seen.setdefault(alloc["job_id"], status["now"])
            draining = sorted(a["job_id"] for a in status["allocations"] if a["state"] == "draining")
            if len(draining) > 1:
                self.draining_together.append((status["now"], draining))


def complete(gateway_url: str, max_tokens: int):
    """One greedy completion through the gateway with the openai client: (text, finish_reason)."""
    import openai

    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=60) as client:
        choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens,
                                           temperature=0).choices[0]
    return choice.text, choice.finish_reason


class Stream(threading.Thread):
    """One greedy streaming completion through the gateway with the openai client, consumed in the background."""

    def __init__(self, gateway_url: str, max_tokens: int = MAX_TOKENS):
        super().__init__(daemon=True)
        self.gateway_url, self.max_tokens = gateway_url, max_tokens
        self.text, self.finish, self.chunks, self.error = "", None, 0, None

    def run(self) -> None:
        import openai

        try:
            with openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key=USER_KEY, max_retries=0,
                               timeout=180) as client:
                for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=self.max_tokens,
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
    convert(small_llama_dir, root / "models" / MODEL, progress=False)
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
        named = subprocess.run(["squeue", "-h", "-o", "%i", "-n", f"hpcllm-pool-{MODEL}"], capture_output=True,
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


def test_retirement_live_migrates_and_replaces_before_walltime(stack, small_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gateway_url, controller_url, root, backend = stack
    deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=30, json={"name": MODEL, "source": str(root / "models" / MODEL), "gpus": 0,
                                            "min_instances": 2, "max_instances": 2})
    assert deployed.status_code == 201, deployed.text
    monitor = StatusMonitor(controller_url)
    monitor.start()

    # The uninterrupted reference (transformers' greedy generate), computed once the streams are done (earlier, its
    # 5-50 s of CPU would slow the allocations' start on this 2-core host).
    reference: dict = {}

    def compute_reference():
        tokenizer = AutoTokenizer.from_pretrained(small_llama_dir)
        pair = (AutoModelForCausalLM.from_pretrained(small_llama_dir).eval(), tokenizer)
        prompt_ids = tokenizer(PROMPT)["input_ids"]
        reference["text"], reference["finish"], reference["tokens"] = hf_greedy(pair, prompt_ids, MAX_TOKENS)
        reference["short"] = hf_greedy(pair, prompt_ids, 12)[:2]

    hf = threading.Thread(target=compute_reference)
    try:
        _run_scenario(gateway_url, controller_url, root, backend, monitor, reference, hf)
    finally:
        monitor.stop.set()
        monitor.join(5)
        if hf.ident is not None:
            hf.join()


def _run_scenario(gateway_url, controller_url, root, backend, monitor, reference, hf):
    # 1. The controller submits A, starts an instance there, then (cpu_slots_per_node = 1) submits B for the
    #    second one. Both get a retirement time once Slurm says they run.
    def two_ready_with_retire_times():
        status = admin_status(controller_url)
        allocs = [a for a in status["allocations"] if a["model"] == MODEL and a["retire_at"] is not None]
        ready = [i for i in status["instances"] if i["model"] == MODEL and i["state"] == "ready"]
        return (status, allocs, ready) if len(allocs) == 2 and len(ready) == 2 else None

    status, allocs, ready = wait_for(two_ready_with_retire_times, 90,
                                     "two allocations with retirement times, each with a ready instance")
    a, b = sorted(allocs, key=lambda x: x["started_at"])
    assert a["job_id"] != b["job_id"] and set(a["nodes"]).isdisjoint(b["nodes"]), allocs
    node_job = {n["node_id"]: n["slurm_job_id"] for n in status["nodes"]}
    instance_of = {node_job[i["node_id"]]: i for i in ready}
    assert set(instance_of) == {a["job_id"], b["job_id"]}, (ready, status["nodes"])  # one instance on each
    for alloc in (a, b):
        assert alloc["walltime_end"] == alloc["started_at"] + WALLTIME, alloc  # Slurm's end = start + 2 min

    # 2. Retirement times by hand. A got its time first (B did not exist yet): lead before its walltime end.
    gap = b["started_at"] - a["started_at"]
    assert a["retire_at"] == a["walltime_end"] - RETIRE_LEAD
    if gap < RETIRE_STAGGER:
        # B's own time (gap after A's) is within the stagger of A's; the latest time a stagger away from A's is a
        # stagger before it (not a stagger before B's own time). So B, the younger, retires first.
        assert b["retire_at"] == a["retire_at"] - RETIRE_STAGGER, (a, b)
        assert b["retire_at"] == b["walltime_end"] - RETIRE_LEAD - RETIRE_STAGGER - gap, (a, b)
        first, second = b, a
    else:  # B started a stagger or more after A (a very slow host): no move, A retires first
        assert b["retire_at"] == b["walltime_end"] - RETIRE_LEAD, (a, b)
        first, second = a, b
    assert second["retire_at"] - first["retire_at"] >= RETIRE_STAGGER  # they never leave together
    assert first["retire_at"] > first["started_at"] + 10, first  # it served for a while first

    # 3. A long greedy stream on the retiring instance, started STREAM_LEAD_IN s before its retirement (ticks every
    #    0.5 s: the move comes at most ~0.6 s late, long before the stream's end). The controller routes to the
    #    least-loaded instance, ties by instance id: when the other instance wins the tie, a ballast stream goes
    #    there first, and once a heartbeat counts it (while it still runs) the stream goes to the retiring one.
    retiring, staying = instance_of[first["job_id"]], instance_of[second["job_id"]]
    # Each gateway worker loads the model's tokenizer on its first request (seconds on a busy host): done now, by a
    # few concurrent requests, so that the stream below is routed within milliseconds of its start.
    warm_ups = [threading.Thread(target=complete, args=(gateway_url, 1)) for _ in range(6)]
    for thread in warm_ups:
        thread.start()
    for thread in warm_ups:
        thread.join(60)
    warmed = time.time()  # a heartbeat from each node, and the warm-up routes no longer count as load
    wait_for(lambda: all(n["last_heartbeat"] > warmed for n in admin_status(controller_url)["nodes"]
                         if n["node_id"] in (retiring["node_id"], staying["node_id"])), 15,
             "a heartbeat from each node after the warm-up", interval=0.2)
    lead_in = first["retire_at"] - time.time()
    assert lead_in > BALLAST_LEAD_IN + 0.5, f"the instances were ready only {lead_in:.1f} s before the retirement"
    streams = []
    if staying["instance_id"] < retiring["instance_id"]:
        time.sleep(max(0.0, first["retire_at"] - BALLAST_LEAD_IN - time.time()))
        streams.append(Stream(gateway_url))
        streams[0].start()
        wait_for(lambda: streams[0].chunks or streams[0].error, 30, "the ballast stream's first chunk",
                 interval=0.05)
        assert streams[0].error is None, streams[0].error
        assert running_requests(staying, controller_url) == 1, "the ballast stream did not go to the staying instance"
        wait_for(lambda: any(i["instance_id"] == staying["instance_id"] and i["running_requests"]
                             for i in admin_status(controller_url)["instances"]), 10,
                 "a heartbeat to count the ballast stream's request", interval=0.1)
        assert streams[0].is_alive(), "the ballast stream ended before the stream could start"
    time.sleep(max(0.0, first["retire_at"] - STREAM_LEAD_IN - time.time()))
    assert first["retire_at"] - time.time() > 0.3, "too late for the stream (the host is very slow)"
    main = Stream(gateway_url)
    main.start()
    streams.append(main)
    wait_for(lambda: main.chunks or main.error, 30, "the stream's first chunk", interval=0.05)
    assert main.error is None, main.error
    assert running_requests(retiring, controller_url) == 1, "the stream did not go to the retiring instance"

    # 4. The retirement: the allocation drains, its instance's stream moves live, a replacement is submitted.
    for stream in streams:
        stream.join(120)
        assert not stream.is_alive(), "a stream did not finish"
        assert stream.error is None, stream.error  # the client saw no break
        assert stream.finish == "length", stream.finish
    hf.start()
    assert first["job_id"] in monitor.retired_seen, f"{first['job_id']} never drained: {monitor.last}"
    assert monitor.retired_seen[first["job_id"]] >= first["retire_at"]

    # The stream can end on the destination before the controller's migrate-out call returns and counts the move.
    wait_for(lambda: model_total(controller_url, "hpcllm_controller_migrations_total", trigger="retire",
                                 outcome="migrated"), 30, "the controller to count the retirement's move")
    migrations = model_total(gateway_url, "hpcllm_request_migrations_total")
    controller_log = (root / "controller.log").read_text()
    assert migrations == 1, f"gateway counted {migrations} live migrations; controller log:\n{controller_log[-4000:]}"
    assert model_total(gateway_url, "hpcllm_request_resumes_total") == 0
    assert model_total(gateway_url, "hpcllm_migration_pause_seconds_count") == 1  # one hand-over pause observed
    assert model_total(controller_url, "hpcllm_controller_migrations_total", trigger="retire", outcome="migrated") == 1
    assert model_total(controller_url, "hpcllm_controller_migrations_total") == 1  # no other move
    assert model_total(controller_url, "hpcllm_controller_migrated_requests_total", trigger="retire") == 1
    assert (f"moved instance {retiring['instance_id']} ({MODEL}) off {retiring['node_id']} for retire: migrated, "
            f"1 requests live-migrated to {staying['instance_id']}") in controller_log, controller_log[-4000:]

    # 5. The retired job is cancelled once empty, long before its walltime; the controller knows why it ended.
    def retired_ended():
        allocs = {a["job_id"]: a for a in admin_status(controller_url)["allocations"]}
        return allocs[first["job_id"]] if allocs[first["job_id"]]["state"] == "ended" else None

    ended = wait_for(retired_ended, 60, f"allocation {first['job_id']} to end")
    assert ended["reason"] == "walltime", ended  # retired ahead of its walltime (not idle, not lost)
    slurm_status = backend.statuses([first["job_id"]])[first["job_id"]]
    assert slurm_status.raw_state == "CANCELLED", slurm_status  # scancel'd by the controller: not TIMEOUT
    assert slurm_status.end_time is not None and slurm_status.end_time < first["walltime_end"] - 30, slurm_status
    assert not monitor.draining_together, monitor.draining_together
    second_now = next(a for a in admin_status(controller_url)["allocations"] if a["job_id"] == second["job_id"])
    assert second_now["state"] == "running", second_now  # the other one serves on

    # 6. The replacement: a third allocation with a ready instance, and the model keeps serving.
    def replacement_ready():
        status = admin_status(controller_url)
        jobs = {n["node_id"]: n["slurm_job_id"] for n in status["nodes"]}
        return [i for i in status["instances"] if i["model"] == MODEL and i["state"] == "ready"
                and jobs.get(i["node_id"]) not in (first["job_id"], second["job_id"])]

    wait_for(replacement_ready, 90, "the replacement allocation's instance to be ready")
    after = complete(gateway_url, 12)

    # 7. Every text equals transformers' greedy generate: nothing lost or repeated across the move.
    hf.join()
    assert reference["tokens"] == MAX_TOKENS and reference["finish"] == "length"  # no eos before MAX_TOKENS
    for stream in streams:
        assert stream.text == reference["text"]
    assert after == reference["short"]
