"""Placement makes room by live-migrating another model's busy instance, end to end on the real dev cluster
(docs/placement.md, "What the controller does with the decision").

A real `hpcllm controller`, node-agent jobs on n1 and n2, a gunicorn `hpcllm gateway`, the official `openai` client.
Every node offers one CPU slot (controller.cpu_slots_per_node = 1) and nothing else may be allocated
(allocate_on_demand = false). CPU slots, not GPUs: the dev cluster's GPUs are fake (gres), and a GPU instance's
worker runs with --device cuda, which cannot load on this host; the placement arithmetic is the same. Model A
(max_instances 2) gets one ready instance on each node: a route call cold-starts the first, and the same call scales
out (scale_out_running_requests = 1) to the other node, the only one with a free slot. Model B, a second deployed
copy of the same checkpoint, is put in the DRAM cache of the node X whose A instance the next route picks
(`hpcllm cache warm B --nodes X --tier dram`).

A long greedy streaming completion of A then runs on X's A instance, and B is requested through the gateway. No node
has a free slot, so placement must move A's instance off one node. Moving costs the same on both nodes (this test sets
eviction_seconds = migration_seconds_per_instance, and its prompt is too short - under 16 tokens - for a worker to
measure a prefill rate, so the busy instance costs migration_seconds_per_instance too; with the defaults placement
would rather evict the idle A instance than move the busy one, and a checkpoint this small loads in milliseconds
from any tier), so B's load time decides: X, where B is in DRAM. The controller marks X's A instance draining and calls its agent's migrate-out with
the other node's A instance as the target: the stream moves there live while it keeps decoding, the agent stops the
instance, B starts on X.

Checks: the placement breakdown (`hpcllm status --json`) is the one computed by hand from the registered bandwidths
(node X, tier dram, X's A instance to move, migration_seconds); the client's stream never breaks and its text equals
transformers' greedy `generate`; the gateway counted one live migration and no resume-from-tokens; the controller
counted one placement move with outcome `migrated`, logged with its target; B becomes ready on X and answers with
transformers' text. Everything started here (jobs, processes) is stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (
    HPCLLM,
    answers,
    clean_up_e2e,
    free_port,
    metric_samples,
    run_hpcllm,
    start_logged,
    stop_process,
    transformers_greedy,
    wait_for,
    warm_and_wait,
    worker_running_requests,
    write_e2e_config,
)
from e2e_helpers import admin_status as e2e_admin_status

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.templates import node_agent_job_spec

pytestmark = pytest.mark.slurm

SECRET = "placement-move-e2e-secret"
ADMIN = "placement-move-e2e-admin"
USER_KEY = "placement-move-e2e-user"
MODEL_A = f"small-llama-a-pm{os.getpid()}"
MODEL_B = f"small-llama-b-pm{os.getpid()}"
NODES = ("n1", "n2")
PROMPT = "hello world"
# The "small" Llama (1024 positions) takes about 5-10 ms a token on this 2-core host when it is idle (the tiny one
# 2 ms: its 480 tokens could end before the hand-over), 30-250 ms beside another test session. B is requested at the
# first chunk; the hand-over came 0.7-2 s after B's placement in the runs here (30-250 ms a token), so 400 tokens
# (2-4 s at idle speed) leave room, and a long stream costs minutes on a busy host.
MAX_TOKENS = 400
TOKENS_BEFORE_B = 1
B_TOKENS = 16
# What moving one instance costs in placement's estimate, busy or idle (both settings; see the module docstring).
MOVE_SECONDS = 2.0


def write_config(root: Path, controller_port: int, gateway_port: int) -> Path:
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"pm{os.getpid()}",
        gateway_port=gateway_port, user_key=USER_KEY, slurm={"gpus_per_node": 0},
        node={"controller_url": f"http://127.0.0.1:{controller_port}", "migrate_timeout_seconds": 20,
              "worker_stop_timeout_seconds": 10},
        controller={"allocate_on_demand": False, "cpu_slots_per_node": 1, "scale_out_running_requests": 1,
                    "eviction_seconds": MOVE_SECONDS, "migration_seconds_per_instance": MOVE_SECONDS,
                    "min_residency_seconds": 0})  # A's instances are moved right after they started


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


def total(url: str, name: str, model: str, **labels: str) -> float:
    """Sum of a counter's samples for `model` (label model_name, on every service) matching labels."""
    return sum(s.value for s in metric_samples(url, name)
               if s.labels.get("model_name") == model and all(s.labels.get(k) == v for k, v in labels.items()))


def instances_of(status: dict, model: str, state: str | None = None) -> list[dict]:
    return [i for i in status["instances"] if i["model"] == model and (state is None or i["state"] == state)]


def agent_log(root: Path, node: str) -> str:
    return next((root / "slurm").glob(f"agent-{node}-*.out")).read_text()


def expected_placement(status: dict, node_with_b_in_dram: str) -> dict[str, tuple[float, str, float]]:
    """B's startup estimate per node, by hand (docs/placement.md): node -> (total seconds, tier, GB/s). Every node
    is up (queue wait 0) and full: one A instance to move, MOVE_SECONDS. B loads from the fastest measured tier
    holding it: X's DRAM copy, else the shared FS (its origin)."""
    size = next(m["size_bytes"] for m in status["models"] if m["name"] == MODEL_B)
    nodes = {n["node_id"]: n for n in status["nodes"]}
    estimates = {}
    for node in NODES:
        tiers = nodes[node]["tiers"]
        options = [("sharedfs", (tiers.get("sharedfs") or {}).get("read_gbps") or 1.0)]  # default_sharedfs_gbps
        if node == node_with_b_in_dram and (tiers.get("dram") or {}).get("read_gbps"):
            options.insert(0, ("dram", tiers["dram"]["read_gbps"]))  # equal load times prefer DRAM
        tier, gbps = min(options, key=lambda o: size / o[1])
        estimates[node] = (size / (gbps * 1e9) + MOVE_SECONDS, tier, gbps)
    return estimates


@pytest.fixture
def stack(slurm_cluster, small_llama_dir, tmp_path):
    """(gateway_url, controller_url, root, env): controller + gateway processes, models A and B deployed (the same
    converted checkpoint under two names), node-agent jobs on n1 and n2 registered."""
    root = Path(tempfile.mkdtemp(prefix="hpcllm-pm-e2e-", dir="/var/tmp"))  # munge wants searchable parents
    root.chmod(0o755)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_config(root, controller_port, gateway_port)
    config = load_config(config_path)
    backend = CliBackend(config.slurm, command_timeout=30)
    convert(small_llama_dir, root / "models" / MODEL_A, progress=False)
    shutil.copytree(root / "models" / MODEL_A, root / "models" / MODEL_B)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["HPCLLM_CONFIG"] = str(config_path)
    controller_url, gateway_url = f"http://127.0.0.1:{controller_port}", f"http://127.0.0.1:{gateway_port}"
    procs: list[tuple[subprocess.Popen, Path]] = []
    jobs: dict[str, str] = {}
    try:
        for name, args in (("controller", []), ("gateway", ["--port", str(gateway_port)])):
            log = root / f"{name}.log"
            procs.append((start_logged([HPCLLM, name, "--config", str(config_path), *args], log, env), log))
        controller, controller_log = procs[0]
        wait_for(lambda: answers(f"{controller_url}/health", controller, controller_log), 60, "the controller")
        for model, max_instances in ((MODEL_A, 2), (MODEL_B, 1)):
            deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                                  timeout=30, json={"name": model, "source": str(root / "models" / model), "gpus": 0,
                                                    "max_instances": max_instances})
            assert deployed.status_code == 201, deployed.text
        for node in NODES:
            spec = node_agent_job_spec(config, gpus_per_node=0, name=f"hpcllm-pm{os.getpid()}-{node}",
                                       agent_args=["--config", str(config_path)], hpcllm=HPCLLM,
                                       output=str(root / "slurm" / f"agent-{node}-%j.out"),
                                       env={"HPCLLM_CONFIG": str(config_path)})
            jobs[node] = backend.submit(spec.model_copy(update={"nodelist": (node,)}))
        gateway, gateway_log = procs[1]
        wait_for(lambda: answers(f"{gateway_url}/health", gateway, gateway_log), 60, "the gateway")

        def registered():
            up = {n["node_id"]: n for n in admin_status(controller_url)["nodes"] if n["state"] == "up"}
            return all(node in up and up[node]["slurm_job_id"] == jobs[node] for node in NODES)

        wait_for(registered, 120, f"the agents on {NODES} to register")
        yield gateway_url, controller_url, root, env
    finally:
        for job in jobs.values():
            backend.cancel(job)
        for proc, _ in reversed(procs):
            stop_process(proc)
        clean_up_e2e(root, tmp_path, f"pm{os.getpid()}")


def test_placement_live_migrates_the_busy_instance_it_moves(stack, small_llama_dir):
    import openai

    gateway_url, controller_url, root, env = stack
    # The uninterrupted references (transformers' greedy generate), computed while A's instances start and B is
    # warmed; the stream waits for them (beside the workers, their CPU would slow the stream 2-4x on this host).
    reference: dict = {}

    def compute_reference():
        reference["a"] = transformers_greedy(small_llama_dir, PROMPT, MAX_TOKENS)
        reference["b"] = transformers_greedy(small_llama_dir, PROMPT, B_TOKENS)

    hf = threading.Thread(target=compute_reference, daemon=True)
    hf.start()

    # One A instance on each node: this route call cold-starts the first and, once it is ready, scales out to the
    # other node (the first node's only slot is taken, and A's instances cannot be moved for A).
    def route_a_ready():
        routed = httpx.get(f"{controller_url}/v1/internal/route", params={"model": MODEL_A, "wait": 10},
                           headers={SECRET_HEADER: SECRET}, timeout=30)
        assert routed.status_code in (200, 202), routed.text
        return routed.status_code == 200

    wait_for(route_a_ready, 120, "A's first instance to be ready")

    def one_ready_a_per_node():
        ready = instances_of(admin_status(controller_url), MODEL_A, "ready")
        return ready if sorted(i["node_id"] for i in ready) == sorted(NODES) else None

    a_instances = wait_for(one_ready_a_per_node, 120, f"one ready instance of A on each of {NODES}")
    # Both idle: the next route picks the smaller instance id. That node gets B's checkpoint in DRAM.
    moving = min(a_instances, key=lambda i: i["instance_id"])
    staying = next(i for i in a_instances if i is not moving)
    x = moving["node_id"]
    status = warm_and_wait(MODEL_B, x, "dram", env, lambda: admin_status(controller_url))
    estimates = expected_placement(status, x)
    expected = min(NODES, key=lambda n: (estimates[n][0], n))  # ties: the name that sorts first
    assert expected == x, f"B in DRAM should make {x} the fastest start: {estimates}; nodes: {status['nodes']}"

    b_result: dict = {}

    def request_b():
        try:
            with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120) as c:
                choice = c.completions.create(model=MODEL_B, prompt=PROMPT, max_tokens=B_TOKENS,
                                              temperature=0).choices[0]
            b_result["answer"] = (choice.text, choice.finish_reason)
        except Exception as exc:  # noqa: BLE001 - reported below
            b_result["error"] = repr(exc)

    b_thread = threading.Thread(target=request_b, daemon=True)
    hf.join(300)
    assert reference["a"][1:] == ("length", MAX_TOKENS), reference  # no eos: the stream runs its full length
    text, finish, b_requested_at = "", None, None
    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120) as client:
        stream = client.completions.create(model=MODEL_A, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        for received, chunk in enumerate(stream, 1):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if received == TOKENS_BEFORE_B:
                assert worker_running_requests(moving["worker_url"], SECRET) == 1, (
                    f"the stream does not run on {x}'s A instance {moving['instance_id']} (the route's tie-break)")
                b_thread.start()  # no free slot anywhere: placing B moves the instance serving this stream
                b_requested_at = time.monotonic()
    streamed_after = time.monotonic() - b_requested_at if b_requested_at else 0.0
    assert b_requested_at is not None, f"the stream ended after fewer than {TOKENS_BEFORE_B} chunks: {text!r}"
    b_thread.join(150)
    # The stream went on, live, to the same text as an uninterrupted greedy run.
    assert text == reference["a"][0]
    assert finish == reference["a"][1] == "length"
    migrations = total(gateway_url, "hpcllm_request_migrations_total", MODEL_A)
    controller_log = (root / "controller.log").read_text()
    assert migrations == 1, (f"no live migration counted; the stream went on {streamed_after:.1f} s after B was "
                             f"requested; controller log:\n{controller_log[-3000:]}\n{x}'s agent log:\n"
                             f"{agent_log(root, x)[-2000:]}")
    assert total(gateway_url, "hpcllm_request_resumes_total", MODEL_A) == 0
    assert total(gateway_url, "hpcllm_migration_pause_seconds_count", MODEL_A) == 1
    # The controller moved exactly one instance for placement, live, to the other node's A instance.
    moves = {s.labels["outcome"]: s.value for s in metric_samples(controller_url, "hpcllm_controller_migrations_total")
             if s.labels.get("model_name") == MODEL_A}
    assert moves == {"migrated": 1.0}, moves
    assert total(controller_url, "hpcllm_controller_migrations_total", MODEL_A, trigger="placement",
                 outcome="migrated") == 1
    assert total(controller_url, "hpcllm_controller_migrated_requests_total", MODEL_A, trigger="placement") == 1
    assert (f"moved instance {moving['instance_id']} ({MODEL_A}) off {x} for placement: migrated, 1 requests "
            f"live-migrated to {staying['instance_id']}") in controller_log, controller_log[-3000:]
    assert (f"instance {moving['instance_id']} ({MODEL_A}): 1 requests live-migrated to {staying['worker_url']}"
            in agent_log(root, x)), agent_log(root, x)[-3000:]

    # B started on X and answered; A keeps its instance on the other node, the moved one is gone.
    assert b_result.get("answer") == reference["b"][:2], b_result

    def settled():
        shown = run_hpcllm("status", "--json", env=env)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        st = json.loads(shown.stdout)
        ids = {i["instance_id"] for i in instances_of(st, MODEL_A)}
        return st if ids == {staying["instance_id"]} and instances_of(st, MODEL_B, "ready") else None

    final = wait_for(settled, 30, "the moved A instance to be gone and B to be ready (`hpcllm status --json`)")
    [b] = instances_of(final, MODEL_B, "ready")
    assert b["node_id"] == x
    breakdown = b["placement"]
    total_seconds, tier, gbps = estimates[x]
    assert breakdown["node"] == x and breakdown["kind"] == "running" and breakdown["considered"] == len(NODES)
    assert breakdown["migrate"] == [moving["instance_id"]]
    assert breakdown["migration_seconds"] == MOVE_SECONDS and breakdown["queue_wait_seconds"] == 0
    assert (breakdown["tier"], breakdown["bandwidth_gbps"]) == (tier, gbps) == ("dram", gbps)
    # plus the start cost (learned from the A instances' cold starts: the same for every node, docs/placement.md)
    assert breakdown["start_seconds"] >= 0
    assert breakdown["total_seconds"] == pytest.approx(total_seconds + breakdown["start_seconds"], rel=1e-9)
    assert b["load_tier"] == "dram"
