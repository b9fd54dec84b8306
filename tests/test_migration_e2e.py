"""Live migration when Slurm preempts a node, end to end on the real dev cluster (docs/node-agent.md, "Drain").

A real `hpcllm controller`, node-agent jobs on n1 and n2 (each keeps one instance of the same small model, `hpcllm
node --model`), a gunicorn `hpcllm gateway`, the official `openai` client. A long greedy streaming completion runs;
the node serving it is then preempted the way Slurm does it: a job in the dev cluster's `high` partition asks for
that node's GPUs, Slurm picks the agent's job as the victim and (preempt_send_user_signal) sends its batch shell
SIGUSR1, which the agent takes as a drain. The agent asks the controller for a target, the worker moves the running
request to the other node's worker in rounds while it keeps decoding, the gateway follows the `migrated` final line.

Checks: the client's stream never breaks, its text equals transformers' greedy `generate` for the same prompt, the
gateway counted a live migration and no resume-from-tokens, the controller named the other node's instance, and the
drained agent logged the move and exited 0. Everything started here (jobs, processes) is stopped at the end.

The same with the model deployed as tensor_parallel = 2: each agent's instance is two ranks under mpirun, and the
preempted node's two-rank instance hands the stream to the other node's (docs/tensor-parallel.md).
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
from e2e_helpers import (HPCLLM, answers, clean_up_e2e, free_port, start_logged, stop_process,
                         transformers_greedy, wait_for, write_e2e_config)
from e2e_helpers import admin_status as e2e_admin_status
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.templates import node_agent_job_spec

pytestmark = pytest.mark.slurm

SECRET = "migration-e2e-secret"
ADMIN = "migration-e2e-admin"
USER_KEY = "migration-e2e-user"
MODEL = f"tiny-llama-mig{os.getpid()}"
NODES = ("n1", "n2")
PROMPT = "hello world"
# Long enough that the preemption lands mid-stream: Slurm picks the victim within ~2-4 s (sched_interval=2), and
# the small model streams 5-20 ms a token on this 2-core host (one torch thread per worker). Its context is 1024.
MAX_TOKENS = 900
TOKENS_BEFORE_PREEMPTION = 2


def write_config(root: Path, controller_port: int, gateway_port: int, tensor_parallel: int = 1) -> Path:
    # No background read sweep (62-65 s of probe reads per agent here, beside the loads and the stream). One spare
    # worker per agent for a 1-rank model: its instances start from the spares, so the stream migrates into a worker
    # started from a spare (the usual destination in production), and the drains stop an agent with a spare waiting.
    # Tensor-parallel ranks (mpirun) never take a spare: none there, it would only import torch beside the stream.
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"mig{os.getpid()}",
        gateway_port=gateway_port, user_key=USER_KEY, slurm={"gpus_per_node": 2},
        node={"controller_url": f"http://127.0.0.1:{controller_port}", "migrate_timeout_seconds": 20,
              "worker_stop_timeout_seconds": 10, "read_sweep": False,
              "spare_workers": 0 if tensor_parallel > 1 else 1},
        controller={"allocate_on_demand": False})


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


def samples(url: str, name: str) -> list:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def model_total(url: str, name: str) -> float:
    """Sum of a counter's samples of MODEL (label model_name, on every service)."""
    return sum(s.value for s in samples(url, name) if s.labels.get("model_name") == MODEL)


def agent_log(root: Path, node: str) -> str:
    """The Slurm output of the node-agent job on node (one file across requeues: --open-mode=append)."""
    return next((root / "slurm").glob(f"agent-{node}-*.out")).read_text()


def serving_node(instances: list[dict]) -> str | None:
    """The node whose worker runs a request now (asked directly: heartbeats lag by a second)."""
    for inst in instances:
        ready = httpx.get(f"{inst['worker_url']}/ready", headers={SECRET_HEADER: SECRET}, timeout=5).json()
        if ready.get("running_requests"):
            return inst["node_id"]
    return None


@pytest.fixture
def stack(slurm_cluster, small_llama_dir, tmp_path, request):
    """(gateway_url, controller_url, root, jobs): controller + gateway processes, the model deployed (with
    tensor_parallel = the fixture's param, default 1), node-agent jobs submitted on n1 and n2 (`jobs`: node -> job
    id; the test adds its preempting job under "high")."""
    tensor_parallel = getattr(request, "param", 1)
    root = Path(tempfile.mkdtemp(prefix="hpcllm-mig-e2e-", dir="/var/tmp"))  # munge wants searchable parents
    root.chmod(0o755)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_config(root, controller_port, gateway_port, tensor_parallel)
    config = load_config(config_path)
    backend = CliBackend(config.slurm, command_timeout=30)
    convert(small_llama_dir, root / "models" / MODEL, progress=False)
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
        # Deployed before the agents start: `hpcllm node --model` looks the model up once it registered.
        deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                              timeout=30, json={"name": MODEL, "source": str(root / "models" / MODEL), "gpus": 0,
                                                "max_instances": 2, "tensor_parallel": tensor_parallel})
        assert deployed.status_code == 201, deployed.text
        for node in NODES:
            # Each agent job holds both of its node's (fake) GPUs, so a job asking for them preempts only this one.
            spec = node_agent_job_spec(config, gpus_per_node=2, name=f"hpcllm-mig{os.getpid()}-{node}",
                                       agent_args=["--config", str(config_path), "--model", MODEL], hpcllm=HPCLLM,
                                       output=str(root / "slurm" / f"agent-{node}-%j.out"),
                                       env={"HPCLLM_CONFIG": str(config_path)})
            jobs[node] = backend.submit(spec.model_copy(update={"nodelist": (node,)}))
        gateway, gateway_log = procs[1]
        wait_for(lambda: answers(f"{gateway_url}/health", gateway, gateway_log), 60, "the gateway")
        yield gateway_url, controller_url, root, jobs
    finally:
        for job in jobs.values():
            backend.cancel(job)
        for proc, _ in reversed(procs):
            stop_process(proc)
        clean_up_e2e(root, tmp_path, f"mig{os.getpid()}")


def test_preempted_node_live_migrates_a_running_stream(stack, slurm_cluster, small_llama_dir):
    preempt_mid_stream(stack, slurm_cluster, small_llama_dir)
    for node in NODES:  # both instances, the preempted one and the destination, started from the agent's spare
        assert f"takes {MODEL}" in agent_log(stack[2], node), agent_log(stack[2], node)[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("stack", [2], indirect=True, ids=["tensor_parallel_2"])
def test_preempted_node_live_migrates_a_running_stream_of_a_tensor_parallel_instance(stack, slurm_cluster,
                                                                                      small_llama_dir):
    preempt_mid_stream(stack, slurm_cluster, small_llama_dir)
    for node in NODES:  # both instances, the preempted one and the destination, were two ranks
        assert "(mpirun of 2 tensor-parallel ranks)" in agent_log(stack[2], node)


def preempt_mid_stream(stack, slurm_cluster, small_llama_dir) -> None:
    import openai

    gateway_url, controller_url, root, jobs = stack
    # The uninterrupted reference (transformers' greedy generate), computed while the agents start and load.
    reference: dict = {}

    def compute_reference():
        reference["text"], reference["finish"], reference["tokens"] = transformers_greedy(
            small_llama_dir, PROMPT, MAX_TOKENS)

    hf = threading.Thread(target=compute_reference)
    hf.start()

    def both_ready():
        instances = [i for i in admin_status(controller_url)["instances"] if i["model"] == MODEL]
        ready = [i for i in instances if i["state"] == "ready"]
        return ready if {i["node_id"] for i in ready} == set(NODES) else None

    instances = wait_for(both_ready, 240, f"one ready instance of the model on each of {NODES}")
    hf.join()
    assert reference["tokens"] == MAX_TOKENS  # no eos: the stream is long enough to be preempted mid-way

    text, finish, source, preempted_at = "", None, None, None
    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120) as client:
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        for received, chunk in enumerate(stream, 1):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if received == TOKENS_BEFORE_PREEMPTION:
                source = serving_node(instances)
                assert source is not None, "no worker runs the request"
                # A higher-priority job wants the serving node's GPUs: Slurm preempts the agent's job.
                jobs["high"] = slurm_cluster.run(
                    "sbatch", "--parsable", "-p", "high", "-w", source, "--gres=gpu:2", "-t", "2",
                    "-J", f"hpcllm-mig{os.getpid()}-preemptor", "-o", "/dev/null", "--wrap", "sleep 120",
                ).stdout.strip().split(";")[0]
                preempted_at = time.monotonic()
    streamed_after = time.monotonic() - preempted_at if preempted_at else 0.0

    assert source is not None, f"the stream ended after fewer than {TOKENS_BEFORE_PREEMPTION} chunks: {text!r}"
    destination = next(n for n in NODES if n != source)
    assert text == reference["text"]
    assert finish == reference["finish"] == "length"

    # The gateway followed a live migration; nothing was regenerated from the tokens (no resume).
    migrations = model_total(gateway_url, "hpcllm_request_migrations_total")
    assert migrations == 1, (f"no live migration counted; the stream went on {streamed_after:.1f} s after the "
                             f"preempting job was submitted; agent log:\n{agent_log(root, source)[-2000:]}")
    assert model_total(gateway_url, "hpcllm_request_resumes_total") == 0
    assert model_total(gateway_url, "hpcllm_migration_pause_seconds_count") == 1  # one hand-over pause observed
    # The draining agent asked the controller, which named the other node's ready instance.
    assert model_total(controller_url, "hpcllm_controller_migration_targets_total") >= 1
    assert sum(s.value for s in samples(controller_url, "hpcllm_controller_migration_targets_total")
               if s.labels.get("outcome") == "ready") >= 1

    # Slurm really preempted the agent, which drained: moved the request, exited 0.
    def drained():
        log = agent_log(root, source)
        return "node agents exited with status" in log and log

    log = wait_for(drained, 60, f"the agent on {source} to finish draining")
    assert "hpcllm: SIGUSR1" in log, log[-3000:]
    assert "1 requests live-migrated to" in log, log[-3000:]
    assert "node agents exited with status 0" in log, log[-3000:]
    assert "node agents exited" not in agent_log(root, destination)  # the other agent serves on
