"""Helpers shared by the end-to-end tests in tests/ (real dev Slurm cluster, real hpcllm processes).

Several test files use this module: add functions, do not change the behaviour of existing ones.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx

from hpcllm.procs import stop_process  # noqa: F401 - the e2e tests take it from here
from hpcllm.tests.ports import free_port  # noqa: F401 - the e2e tests take it from here too

# The `hpcllm` command beside this Python (the venv's console script).
HPCLLM = str(Path(sys.executable).parent / "hpcllm")


# The longest greedy stream an e2e test checks against transformers (test_retirement_e2e's 960 tokens of "hello
# world" on the small Llama; test_migration_e2e's 900, test_placement_move_e2e's 400 and 16 are its first tokens).
GREEDY_REFERENCE_TOKENS = 960
_greedy_runs: dict[tuple[str, str], list[int]] = {}
_greedy_lock = threading.Lock()


def transformers_greedy(model_dir: Path, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """hf_greedy's (text, finish reason, token count) for prompt on the model in model_dir, from one transformers
    `generate` per model and prompt in this pytest process: greedy decoding's first n tokens of a longer run are the
    n-token run, so one run of at least GREEDY_REFERENCE_TOKENS, cut to max_tokens, answers every e2e test (each
    900-token generate of the small Llama took 1 min of CPU on the 2-core host, once per test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.gateway.tests.test_openai_api import greedy_answer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with _greedy_lock:  # tests compute it on threads; the second caller waits for the first one's run
        key = (str(model_dir), prompt)
        tokens = _greedy_runs.get(key)
        if tokens is None or (len(tokens) < max_tokens and tokenizer.eos_token_id not in tokens):
            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            prompt_ids = tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                     max_new_tokens=max(max_tokens, GREEDY_REFERENCE_TOKENS))
            tokens = _greedy_runs[key] = out[0, len(prompt_ids):].tolist()
    return greedy_answer(tokenizer, tokens[:max_tokens])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Polls predicate until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def controller_process(config_path: Path, log_path: Path, start_timeout: float = 60, port: int = 0) -> Iterator[str]:
    """Runs `hpcllm controller --config CONFIG --port PORT` and yields its URL; SIGTERM (then SIGKILL) at the end.
    A fixed port lets a restarted controller be found where its allocations' agents expect it (default: any)."""
    ready = log_path.with_name(log_path.stem + ".url")
    ready.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([HPCLLM, "controller", "--config", str(config_path), "--port", str(port),
                                 "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT)
        try:
            def listening():
                if proc.poll() is not None:
                    raise AssertionError(f"the controller exited {proc.returncode}: {log_path.read_text()[-3000:]}")
                return ready.exists() and ready.read_text().strip()

            yield wait_for(listening, start_timeout, "the controller to listen")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def submit_agent(backend, config, config_path: Path, controller_url: str, node: str, name: str,
                 output_dir: Path) -> str:
    """Submits `hpcllm node-agent` for the controller at controller_url as a Slurm job on `node` (2 fake GPUs);
    the job id."""
    from hpcllm.slurm.templates import node_agent_job_spec

    spec = node_agent_job_spec(config, nodes=1, gpus_per_node=2, name=name, agent_args=["--config", str(config_path)],
                               hpcllm=HPCLLM, output=str(output_dir / f"agent-{node}-%j.out"),
                               env={"HPCLLM_CONTROLLER_URL": controller_url, "HPCLLM_CONFIG": str(config_path)})
    return backend.submit(spec.model_copy(update={"nodelist": (node,)}))


@contextmanager
def control_plane(root: Path, config_path: Path, controller_port: int, gateway_port: int, env: dict[str, str],
                  admin_key: str, extra_jobs: Callable[[], list[str]] = list,
                  processes: dict[str, subprocess.Popen] | None = None) -> Iterator[tuple[str, str]]:
    """A real `hpcllm controller` and gunicorn `hpcllm gateway` (logs in root), yielded as (gateway_url,
    controller_url) once both answer /health. At the end both stop, then every Slurm job the controller submitted
    (read from its database: cancel_controller_jobs) and `extra_jobs()` are cancelled, so no allocation outlives
    the test. `processes`, when given, is filled with the two processes ("controller", "gateway"); a test that
    restarts one puts the new process there, and that one is stopped at the end. (admin_key: kept for the
    callers; the teardown no longer asks the controller.)"""
    from hpcllm.config import load_config
    from hpcllm.slurm.cli_backend import CliBackend

    controller_url, gateway_url = f"http://127.0.0.1:{controller_port}", f"http://127.0.0.1:{gateway_port}"
    procs: dict[str, subprocess.Popen] = processes if processes is not None else {}
    try:
        controller = start_logged([HPCLLM, "controller", "--config", str(config_path)], root / "controller.log", env)
        procs["controller"] = controller
        gateway = start_logged([HPCLLM, "gateway", "--config", str(config_path), "--port", str(gateway_port)],
                               root / "gateway.log", env)
        procs["gateway"] = gateway
        wait_for(lambda: answers(f"{controller_url}/health", controller, root / "controller.log"), 60,
                 "the controller to answer /health")
        wait_for(lambda: answers(f"{gateway_url}/health", gateway, root / "gateway.log"), 60,
                 "the gateway to answer /health")
        yield gateway_url, controller_url
    finally:
        # The controller first: a tick may submit an allocation at any moment until it has stopped, so what it
        # submitted is only known once it has (asking it earlier left such a job running in Slurm).
        for proc in reversed(list(procs.values())):
            stop_process(proc)
        backend = CliBackend(load_config(config_path).slurm, command_timeout=30)
        cancel_controller_jobs(config_path, backend)
        for job in set(extra_jobs()):
            backend.cancel(job)


def cancel_controller_jobs(config_path: Path, backend) -> list[str]:
    """Cancels every live Slurm job a (stopped) controller submitted, as its database records them: its
    allocations, and the jobs tagged (--comment) with any allocation it ever began to submit, also one whose sbatch
    answer it never recorded. Jobs of other controllers on the shared dev cluster are left alone. Returns the
    cancelled job ids."""
    from hpcllm.config import load_config
    from hpcllm.controller.registry import Registry
    from hpcllm.controller.server import database_url_of

    registry = Registry(database_url_of(load_config(config_path)))
    try:
        tags = {c.job_tag for c in registry.credentials("allocation") if c.job_tag}
        tags |= {intent.tag for intent in registry.allocation_intents()}
        recorded = {a.job_id for a in registry.allocations() if a.state != "ended"}
    finally:
        registry.close()
    live = {job_id: status for job_id, status in backend.list_jobs().items() if not status.is_terminal}
    doomed = sorted(job_id for job_id, status in live.items() if job_id in recorded or status.comment in tags)
    for job_id in doomed:
        backend.cancel(job_id)
    return doomed


@contextmanager
def front_door(config_path: Path, run_dir: Path, gateway_url: str) -> Iterator[tuple[str, ssl.SSLContext]]:
    """nginx with TLS in front of the gateway at gateway_url, as `make up` runs it (hpcllm.gateway.frontdoor):
    yields its https URL and an SSL context that trusts only its dev CA; stopped at the end."""
    from hpcllm.config import load_config
    from hpcllm.gateway import frontdoor

    port = free_port()
    door = frontdoor.start(load_config(config_path), run_dir, f"127.0.0.1:{port}",
                           upstream=gateway_url.removeprefix("http://"))
    try:
        yield f"https://localhost:{port}", ssl.create_default_context(cafile=str(door.ca))
    finally:
        frontdoor.stop(door.run_dir)


def start_logged(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts a long-running process with stdout and stderr in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)




def answers(url: str, proc: subprocess.Popen, log: Path) -> bool:
    """True once GET url answers 200; AssertionError with the log's end if the process exited meanwhile."""
    if proc.poll() is not None:
        raise AssertionError(f"{proc.args[1]} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def admin_status(url: str, admin_key: str) -> dict:
    """GET /v1/admin/status of a controller."""
    resp = httpx.get(f"{url}/v1/admin/status", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10)
    resp.raise_for_status()
    return resp.json()


def run_hpcllm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs the real `hpcllm` command as a user would (text output captured); returns the finished process."""
    return subprocess.run([HPCLLM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """A CLI failure as users must see it: non-zero exit, one `error: ...` line naming every phrase, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected exactly one 'error: ' line on stderr:\n{output}"
    missing = [p for p in phrases if p not in errors[0]]
    assert not missing, f"the error line does not mention {missing}: {errors[0]}"


def metric_samples(url: str, name: str) -> list:
    """The samples named `name` (e.g. hpcllm_request_migrations_total) on a service's Prometheus /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def node_key_in(status: dict, node_id: str, secret: str) -> str:
    """The key node_id's agent and workers accept, as the operator derives it (the cluster secret for agents it runs
    with the secret; a node key for the controller's allocations and groups' pools, docs/security.md)."""
    from hpcllm.credentials import worker_key

    node = next(n for n in status["nodes"] if n["node_id"] == node_id)
    return worker_key(secret, node.get("credential_id"), node_id)


def worker_running_requests(worker_url: str, secret: str) -> int:
    """Requests a worker runs or queues now, asked of the worker itself (the controller's view lags a heartbeat)."""
    ready = httpx.get(f"{worker_url}/ready", headers={"X-Hpcllm-Secret": secret}, timeout=5).json()
    return int(ready.get("running_requests") or 0) + int(ready.get("waiting_requests") or 0)


def write_e2e_config(root: Path, *, secret: str, admin: str, controller_port: int, namespace: str,
                     gateway_port: int | None = None, user_key: str | None = None,
                     **sections: dict[str, object]) -> Path:
    """root/hpcllm.toml for an end-to-end test on the dev cluster: state under root, 16 MiB probes, 1 s heartbeats
    and ticks, `namespace` in the agents' shared-memory names (per test process), a gunicorn gateway routing
    through the controller when gateway_port is given; `sections` ({"node": {...}, ...}) add or override keys."""
    config: dict[str, dict[str, object]] = {
        "paths": {"state_dir": str(root / "state"), "models_dir": str(root / "models")},
        "cluster": {"shared_secret": secret},
        "slurm": {"partition": "batch", "time": "00:10:00"},
        "worker": {},
        "node": {"nvme_dir": str(root / "nvme" / "%n"), "dram_namespace": f"{namespace}-%n",
                 "probe_bytes": 16 << 20, "memcpy_probe_bytes": 16 << 20, "heartbeat_seconds": 1.0},
        "controller": {"host": "127.0.0.1", "port": controller_port, "admin_key": admin, "tick_seconds": 1.0},
    }
    if gateway_port is not None:
        config["gateway"] = {"host": "127.0.0.1", "port": gateway_port, "workers": 2, "threads": 8,
                             "router": "controller", "controller_url": f"http://127.0.0.1:{controller_port}",
                             "admin_key": admin}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    lines = []
    for name, values in config.items():
        if values:
            lines += [f"[{name}]", *(f"{key} = {_toml_value(value)}" for key, value in values.items())]
    if gateway_port is not None and user_key is not None:
        lines += ["[[gateway.api_keys]]", f"key = {_toml_value(user_key)}", 'name = "e2e"']
    path = root / "hpcllm.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # holds the secret: the services refuse it otherwise
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def clean_up_e2e(root: Path, keep_logs_in: Path, namespace: str) -> None:
    """After an end-to-end test: drop the agents' DRAM tiers (/dev/shm/hpcllm-<namespace>-<node>, see
    write_e2e_config), keep the logs (controller, gateway, Slurm jobs' output, workers) in keep_logs_in, where pytest
    keeps them readable, and remove root."""
    for folder in Path("/dev/shm").glob(f"hpcllm-{namespace}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    for log in [*root.glob("*.log"), *root.glob("slurm/*.out"), *root.glob("state/slurm/*.out")]:
        shutil.copy(log, keep_logs_in / log.name)
    for log in root.glob("state/node/*/*.log"):
        shutil.copy(log, keep_logs_in / f"{log.parent.name}-{log.name}")
    shutil.rmtree(root, ignore_errors=True)


def warm_and_wait(model: str, node: str, tier: str, env: dict[str, str], status: Callable[[], dict]) -> dict:
    """`hpcllm cache warm MODEL --nodes NODE --tier TIER` (the admin CLI), then the controller's status (from
    `status()`) once a heartbeat has reported the copy."""
    warmed = run_hpcllm("cache", "warm", model, "--nodes", node, "--tier", tier, env=env)
    assert warmed.returncode == 0, warmed.stdout + warmed.stderr

    def reported():
        st = status()
        held = next(n for n in st["nodes"] if n["node_id"] == node)["cached"]
        return st if any(c["model"] == model and c["tier"] == tier for c in held) else None

    return wait_for(reported, 30, f"the controller to see {model} in {node}'s {tier}")
