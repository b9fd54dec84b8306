"""A group's model pool (`sbatch slurm/model-pool.sbatch`) beside the controller, end to end on the real dev cluster
(docs/controller.md, "Model pools").

A real `hpcllm controller` (keep-alive 3 s for A, 8 s for B, a tick a second, one CPU slot per node, eviction_seconds = 0,
allocate_on_demand = false), the repository's slurm/model-pool.sbatch submitted for model A on n1 (its agent runs
`hpcllm node --model A` under srun and registers as A's pool), and an ordinary node-agent job on n2. Model B, a
second deployed copy of the same checkpoint, is put in n1's DRAM cache, so n1 would be B's fastest start if it were a
placement candidate (evicting the pool's idle instance costs nothing here).

Checks: a request for A is routed to the pool's instance and answered; B is placed on n2 with n2 as the only
candidate, and the pool's instance is neither evicted nor moved; after keep-alive the ordinary idle instance (B's)
is stopped while the pool's instance is still the same instance and ready; `hpcllm status` and `--json` name the
pool; when the pool job is told to end (Slurm's USR1 to its batch shell), its agent drains and the controller
forgets the pool's instance. Then a second pool of A on n3 whose time limit is cut (`scontrol update TimeLimit=`)
below retire_lead_seconds hands over before its end: its agent reports the new end, the controller starts A on n2
and, once that is ready, drains the pool, whose agent exits by itself (the job COMPLETED). Everything started here
(jobs, processes) is stopped at the end, also on failure.

The pool runs as a group would (docs/security.md): with a pool token the admin issued (`hpcllm pool token issue
--model A --group physics --output FILE`) and a config whose cluster secret is wrong - a group never holds it. The
controller routes the group's requests there and hands out the pool worker's node key; the worker refuses the
cluster secret.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (HPCLLM, answers, clean_up_e2e, free_port, run_hpcllm, start_logged, stop_process,
                         wait_for, warm_and_wait, write_e2e_config)
from e2e_helpers import admin_status as e2e_admin_status

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.node.job_end import read_job_end
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.templates import node_agent_job_spec
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import GenerateRequest

pytestmark = pytest.mark.slurm

SECRET = "pool-e2e-secret"
ADMIN = "pool-e2e-admin"
GROUP = "physics"
MODEL_A = f"tiny-pool-a-{os.getpid()}"
MODEL_B = f"tiny-pool-b-{os.getpid()}"
POOL_NODE, OTHER_NODE, SECOND_POOL_NODE = "n1", "n2", "n3"
KEEP_ALIVE = 3.0  # A's (the pool's model), and the controller's default
B_KEEP_ALIVE = 8.0  # long enough to read B's placement after its request, even on a busy host
POOL_SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "model-pool.sbatch"


def write_config(root: Path, controller_port: int) -> Path:
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"pool{os.getpid()}",
        slurm={"gpus_per_node": 0},
        node={"controller_url": f"http://127.0.0.1:{controller_port}", "spare_workers": 0,
              "migrate_timeout_seconds": 10, "worker_stop_timeout_seconds": 10},
        controller={"allocate_on_demand": False, "keep_alive_seconds": KEEP_ALIVE, "cpu_slots_per_node": 1,
                    "eviction_seconds": 0})


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


def instances_of(status: dict, model: str) -> list[dict]:
    return [i for i in status["instances"] if i["model"] == model]


def route(controller_url: str, model: str, wait: float = 0, group: str | None = None) -> httpx.Response:
    params = {"model": model, "wait": wait, **({"group": group} if group else {})}
    resp = httpx.get(f"{controller_url}/v1/internal/route", params=params, headers={SECRET_HEADER: SECRET},
                     timeout=wait + 30)
    assert resp.status_code in (200, 202), resp.text
    return resp


def generate(worker_url: str, request_id: str, max_tokens: int = 4, key: str | None = None) -> list[int]:
    with WorkerClient(worker_url, key or SECRET) as worker:
        with worker.generate(GenerateRequest(request_id=request_id, prompt="hello world", max_tokens=max_tokens,
                                             temperature=0)) as stream:
            return [line.token_id for line in stream if line.type == "token"]


def logs(root: Path) -> str:
    """The ends of the agents' and the controller's logs, without the HTTP request lines, for failure messages."""
    parts = []
    for path in [*sorted((root / "slurm").glob("*.out")), root / "controller.log"]:
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if "HTTP Request:" not in line
                     and '" 200 -' not in line and '" 202 -' not in line]
            parts.append(f"--- {path.name}\n" + "\n".join(lines[-40:]))
    return "\n".join(parts)


def end_pool(slurm_cluster, controller_url: str, root: Path, pool_job: str) -> None:
    """The pool job told to end the way Slurm does it near the time limit (USR1 to the batch shell): its agent drains
    and exits, and the controller forgets the pool's instance."""
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", pool_job)

    def forgotten():
        st = admin_status(controller_url)
        node = next(n for n in st["nodes"] if n["node_id"] == POOL_NODE)
        return st if not instances_of(st, MODEL_A) and node["state"] != "up" else None

    wait_for(forgotten, 45, "the controller to forget the ended pool's instance")

    def drained():
        log = next((root / "slurm").glob("pool-*.out")).read_text()
        return "node agents exited with status" in log and log

    log = wait_for(drained, 45, "the pool's agent to finish draining")
    assert "node agents exited with status 0" in log, log[-3000:]


@pytest.fixture
def stack(slurm_cluster, tiny_llama_dir, tmp_path):
    """(controller_url, root, env, pool_job): the controller, models A and B deployed (one checkpoint, two names),
    A's pool (slurm/model-pool.sbatch) on n1 and a node-agent job on n2, both registered."""
    root = Path(tempfile.mkdtemp(prefix="hpcllm-pool-e2e-", dir="/var/tmp"))  # munge wants searchable parents
    root.chmod(0o755)
    (root / "slurm").mkdir()
    controller_port = free_port()
    config_path = write_config(root, controller_port)
    config = load_config(config_path)
    backend = CliBackend(config.slurm, command_timeout=30)
    convert(tiny_llama_dir, root / "models" / MODEL_A, progress=False)
    shutil.copytree(root / "models" / MODEL_A, root / "models" / MODEL_B)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(HPCLLM_CONFIG=str(config_path), COLUMNS="250")
    controller_url = f"http://127.0.0.1:{controller_port}"
    jobs: list[str] = []
    controller = None
    try:
        controller = start_logged([HPCLLM, "controller", "--config", str(config_path)], root / "controller.log", env)
        wait_for(lambda: answers(f"{controller_url}/health", controller, root / "controller.log"), 60,
                 "the controller")
        # Deployed before the pool starts: its agent looks A up once it registered.
        for model, keep_alive in ((MODEL_A, KEEP_ALIVE), (MODEL_B, B_KEEP_ALIVE)):
            deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                                  timeout=30, json={"name": model, "source": str(root / "models" / model), "gpus": 0,
                                                    "keep_alive_seconds": keep_alive, "max_instances": 1})
            assert deployed.status_code == 201, deployed.text
        # The admin issues the group's pool token; the group's config holds no cluster secret (a wrong one here).
        token_file = root / "group" / "pool-token"
        token_file.parent.mkdir()
        issued = run_hpcllm("pool", "token", "issue", "--model", MODEL_A, "--group", GROUP, "--output",
                            str(token_file), env=env)
        assert issued.returncode == 0 and token_file.stat().st_mode & 0o777 == 0o600, issued.stdout + issued.stderr
        group_config = write_e2e_config(
            root / "group", secret="the-group-does-not-know-the-secret", admin="not-the-admin",
            controller_port=controller_port, namespace=f"pool{os.getpid()}", slurm={"gpus_per_node": 0},
            node={"controller_url": f"http://127.0.0.1:{controller_port}", "spare_workers": 0,
                  "migrate_timeout_seconds": 10, "worker_stop_timeout_seconds": 10, "job_end_refresh_seconds": 1})
        # The pool as a group submits it (the script's own #SBATCH lines, GPUS=1 of the node's two fake GPUs; the
        # model itself serves on CPU). OMP_NUM_THREADS=1: two CPU workers share this host's two cores.
        exports = {"MODEL": MODEL_A, "HPCLLM": HPCLLM, "HPCLLM_CONFIG": str(group_config), "OMP_NUM_THREADS": "1",
                   "HPCLLM_NODE_TOKEN_FILE": str(token_file)}

        def submit_pool(node: str, name: str) -> str:
            submitted = slurm_cluster.run(
                "sbatch", "--parsable", "-w", node, "--time", "00:10:00", "-J", f"hpcllm-pool{os.getpid()}",
                "-o", str(root / "slurm" / f"{name}-%j.out"),
                "--export", "ALL," + ",".join(f"{k}={v}" for k, v in exports.items()), str(POOL_SBATCH))
            jobs.append(submitted.stdout.strip().split(";")[0])
            return jobs[-1]

        pool_job = submit_pool(POOL_NODE, "pool")
        spec = node_agent_job_spec(config, gpus_per_node=0, name=f"hpcllm-pool{os.getpid()}-{OTHER_NODE}",
                                   agent_args=["--config", str(config_path)], hpcllm=HPCLLM,
                                   output=str(root / "slurm" / f"agent-{OTHER_NODE}-%j.out"),
                                   env={"HPCLLM_CONFIG": str(config_path), "OMP_NUM_THREADS": "1"})
        jobs.append(backend.submit(spec.model_copy(update={"nodelist": (OTHER_NODE,)})))

        def registered():
            up = {n["node_id"]: n for n in admin_status(controller_url)["nodes"] if n["state"] == "up"}
            return up if {POOL_NODE, OTHER_NODE} <= set(up) else None

        wait_for(registered, 90, f"the agents on {POOL_NODE} and {OTHER_NODE} to register")
        yield controller_url, root, env, pool_job, submit_pool
    finally:
        for job in jobs:
            backend.cancel(job)
        if controller is not None:
            stop_process(controller)
        clean_up_e2e(root, tmp_path, f"pool{os.getpid()}")


def test_a_pool_keeps_its_instance_and_hosts_nothing_else(stack, slurm_cluster):
    controller_url, root, env, pool_job, submit_pool = stack

    # The pool's agent starts A by itself and registers as A's pool.
    def pool_ready():
        st = admin_status(controller_url)
        ready = [i for i in instances_of(st, MODEL_A) if i["state"] == "ready"]
        return (st, ready[0]) if ready else None

    status, pooled = wait_for(pool_ready, 90, f"the pool's instance of {MODEL_A} to be ready", interval=1)
    assert pooled["node_id"] == POOL_NODE
    nodes = {n["node_id"]: n for n in status["nodes"]}
    assert nodes[POOL_NODE]["pool_model"] == MODEL_A and nodes[OTHER_NODE]["pool_model"] is None
    # It registered with its pool token and serves its group only; n2's agent is the operator's (the secret).
    assert nodes[POOL_NODE]["credential_id"].startswith("pool-") and nodes[POOL_NODE]["serves_group"] == GROUP
    assert nodes[OTHER_NODE]["credential_id"] == "cluster" and nodes[OTHER_NODE]["serves_group"] is None

    # A request of the group for A goes to the pool's instance and is answered there, with the worker's node key.
    routed = route(controller_url, MODEL_A, group=GROUP).json()
    assert (routed["status"], routed["instance_id"], routed["node_id"]) == ("ready", pooled["instance_id"], POOL_NODE)
    assert routed["worker_key"] and routed["worker_key"] != SECRET
    assert len(generate(routed["worker_url"], "pool-a-1", key=routed["worker_key"])) == 4
    # The group's worker does not take the cluster secret (the group never had it).
    with pytest.raises(WorkerError) as refused:
        generate(routed["worker_url"], "pool-a-secret")
    assert refused.value.status == 401

    # B's checkpoint in the pool node's DRAM: were n1 a candidate, evicting the idle pool instance (0 s) and
    # loading from DRAM would be B's fastest start.
    status = warm_and_wait(MODEL_B, POOL_NODE, "dram", env, lambda: admin_status(controller_url))
    nodes = {n["node_id"]: n for n in status["nodes"]}
    assert nodes[POOL_NODE]["tiers"]["dram"]["read_gbps"] > nodes[OTHER_NODE]["tiers"]["sharedfs"]["read_gbps"], (
        f"n1's DRAM should be the faster tier for this test to mean something: {nodes}")

    # B must start on n2, the only candidate; the pool keeps its instance.
    def b_ready():
        resp = route(controller_url, MODEL_B, wait=10)
        return resp.json() if resp.status_code == 200 else None

    routed_b = wait_for(b_ready, 90, f"{MODEL_B} to be ready", interval=0.2)
    assert routed_b["node_id"] == OTHER_NODE, logs(root)
    assert len(generate(routed_b["worker_url"], "pool-b-1")) == 4
    status = admin_status(controller_url)
    [b] = instances_of(status, MODEL_B)
    assert (b["node_id"], b["placement"]["node"], b["placement"]["considered"]) == (OTHER_NODE, OTHER_NODE, 1)
    assert b["placement"]["migrate"] == []
    [a] = instances_of(status, MODEL_A)
    assert (a["instance_id"], a["state"], a["node_id"]) == (pooled["instance_id"], "ready", POOL_NODE)

    # Past keep-alive: B's idle instance is stopped, the pool's is not.
    def b_stopped():
        st = admin_status(controller_url)
        return st if not instances_of(st, MODEL_B) else None

    status = wait_for(b_stopped, B_KEEP_ALIVE + 30, f"{MODEL_B}'s idle instance to be stopped after keep-alive")
    [a] = instances_of(status, MODEL_A)
    assert status["now"] - a["last_used"] > KEEP_ALIVE + 3  # well past A's keep-alive too
    assert (a["instance_id"], a["state"]) == (pooled["instance_id"], "ready"), logs(root)
    controller_log = (root / "controller.log").read_text()
    assert f"stop_idle {b['instance_id']}" in controller_log
    assert f"stop_idle {pooled['instance_id']}" not in controller_log

    # `hpcllm status` names the pool.
    shown = run_hpcllm("status", "--json", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    nodes = {n["node_id"]: n for n in json.loads(shown.stdout)["nodes"]}
    assert (nodes[POOL_NODE]["pool_model"], nodes[OTHER_NODE]["pool_model"]) == (MODEL_A, None)
    shown = run_hpcllm("status", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    pool_row = next(line for line in shown.stdout.splitlines() if f" {POOL_NODE} " in line and "up" in line)
    assert MODEL_A in pool_row, shown.stdout

    end_pool(slurm_cluster, controller_url, root, pool_job)


@pytest.mark.long
def test_a_pool_hands_over_to_a_service_node_before_its_job_ends(stack, slurm_cluster):
    controller_url, root, env, pool_job, submit_pool = stack
    # The first pool (n1) ends first, so that A's replacement must start on the service node.
    end_pool(slurm_cluster, controller_url, root, pool_job)

    # Before its job ends a pool hands over (docs/controller.md "A pool's job end"): a second pool of the group, on
    # n3, whose time limit is then cut to 4 minutes - less than retire_lead_seconds (300 s) left. Its agent reads the
    # new end (squeue, every second here); the controller starts A on n2 (the group's requests may go to a service
    # node), and once that is ready marks the pool draining: its agent drains into it and exits, the job COMPLETED
    # long before its limit.
    second_job = submit_pool(SECOND_POOL_NODE, "pool2")

    def second_pool_ready():
        st = admin_status(controller_url)
        return st if any(i["node_id"] == SECOND_POOL_NODE and i["state"] == "ready"
                         for i in instances_of(st, MODEL_A)) else None

    status = wait_for(second_pool_ready, 90, f"the second pool's instance of {MODEL_A} on {SECOND_POOL_NODE}")
    pool2 = next(n for n in status["nodes"] if n["node_id"] == SECOND_POOL_NODE)
    assert pool2["job_end"] is not None and pool2["phase"] is None, pool2  # 10 minutes left: not retiring
    slurm_cluster.run("scontrol", "update", f"JobId={second_job}", "TimeLimit=00:04:00")

    def retiring():
        node = next(n for n in admin_status(controller_url)["nodes"] if n["node_id"] == SECOND_POOL_NODE)
        return node if node["phase"] or node["state"] != "up" else None

    pool2_now = wait_for(retiring, 20, f"{SECOND_POOL_NODE} to retire", interval=0.2)
    assert pool2_now["job_end"] < pool2["job_end"] - 300, (pool2, pool2_now)  # the cut end, as the agent read it

    def handed_over():
        log = next((root / "slurm").glob("pool2-*.out")).read_text()
        return "node agents exited with status" in log and log

    log = wait_for(handed_over, 60, "the second pool to hand over and exit", interval=0.5)
    assert "hands this pool over before its Slurm job ends" in log and "exited with status 0" in log, log[-3000:]
    controller_log = (root / "controller.log").read_text()
    assert f"retire_pool {SECOND_POOL_NODE}" in controller_log, logs(root)
    status = admin_status(controller_url)
    assert any(c["model"] == MODEL_A and c["node_id"] == OTHER_NODE for c in status["cold_starts"]), status
    wait_for(lambda: slurm_cluster.run("squeue", "--noheader", f"--jobs={second_job}", "--states=all",
                                       "--format=%T").stdout.strip() == "COMPLETED", 20,
             f"the second pool's job {second_job} to complete (not to run into its time limit)")


def test_a_pool_agent_reads_its_jobs_end_from_the_real_squeue_as_the_limit_changes(slurm_cluster):
    """What a pool's agent reports as its job's end (hpcllm.node.job_end: the controller's hand-over plan) from the
    real squeue: start + time limit, moved by `scontrol update TimeLimit=`, none once the limit is UNLIMITED."""
    job = slurm_cluster.run("sbatch", "--parsable", "--time", "00:10:00", "-J", f"hpcllm-job-end{os.getpid()}",
                            "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip().split(";")[0]
    epoch = {**slurm_cluster.env, "SLURM_TIME_FORMAT": "%s"}

    def started() -> float | None:
        shown = subprocess.run(["squeue", "--noheader", f"--jobs={job}", "--format=%T %S"], env=epoch, text=True,
                               capture_output=True, timeout=30, check=True).stdout.split()
        return float(shown[1]) if shown[:1] == ["RUNNING"] else None

    try:
        start = wait_for(started, 60, f"job {job} to start")
        assert read_job_end(job, 10) == start + 600
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=00:20:00")
        assert read_job_end(job, 10) == start + 1200
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=UNLIMITED")
        assert read_job_end(job, 10) is None
    finally:
        slurm_cluster.run("scancel", job, check=False)
