"""The node agent's HTTP API with the Flask test client, a real CacheManager in a temporary folder and real
`hpcllm worker` processes serving the tiny converted test model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpcllm.checkpoint.converter import convert
from hpcllm.config import parse_config
from hpcllm.credentials import node_key
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.node.agent import NodeAgent, expand_node_pattern
from hpcllm.node.app import create_app
from hpcllm.node.cache import CacheManager
from hpcllm.node.gpus import GpuInventory
from hpcllm.node.probes import ProbeResult, TierMeasurements
from hpcllm.node.protocol import StartInstance
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest

SECRET = "agent-test-secret"
AUTH = {SECRET_HEADER: SECRET}


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    convert(tiny_llama_dir, out, progress=False)
    return out


def make_agent(tmp_path: Path, gpus: int = 0, sweep=None, probe=None, model_process="auto", **node) -> NodeAgent:
    """model_process: [worker] model_process of the agent and its workers (a config file the workers read). False
    where a test is about the agent, not the worker's engine: a CPU worker or spare then starts one process, not two
    (each imports torch: seconds of CPU)."""
    config_path = None
    if model_process != "auto":
        tmp_path.mkdir(parents=True, exist_ok=True)
        config_path = tmp_path / "worker.toml"
        config_path.write_text(f"[worker]\nmodel_process = {json.dumps(model_process)}\n")
    config = parse_config({
        "paths": {"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "models")},
        "cluster": {"shared_secret": SECRET},
        "node": {"nvme_dir": str(tmp_path / "nvme-%n"), "probe_bytes": 1 << 20, "memcpy_probe_bytes": 1 << 20,
                 "worker_stop_timeout_seconds": 10, "spare_workers": 0,
                 # these tests count cache entries: no copy on load unless a test asks (test_cache_on_load.py)
                 "cache_on_load": [], **node},
        "controller": {"port": 1},  # nothing listens there: these tests never register
        "worker": {"model_process": model_process},
    })
    cache = CacheManager(tmp_path / "nvme", 10**9, 10**9, "agent-test", dram_root=tmp_path / "shm")
    measurements = TierMeasurements(nvme=ProbeResult(2.0, "odirect", 1, 1), sharedfs=ProbeResult(1.0, "buffered", 1, 1),
                                    dram=ProbeResult(20.0, "memcpy", 1, 1))
    return NodeAgent(config, config_path=config_path, cache=cache,
                     gpus=GpuInventory(tuple(str(i) for i in range(gpus)), "test"),
                     measurements=measurements, sweep=sweep, probe=probe)


@contextmanager
def agents_over_http(tmp_path: Path, names=("n1", "n2")):
    """Real node agents named `names`, each serving its HTTP API on 127.0.0.1, and a CLI config file holding their
    shared secret. Yields (agents, urls, config path); stops the agents on exit."""
    agents, urls = [], []
    try:
        for name in names:
            agent = make_agent(tmp_path / name, port=0, listen_host="127.0.0.1")
            agent.node_id = name
            agents.append(agent)
            urls.append(agent.start_server(create_app(agent)))
        config = tmp_path / "hpcllm.toml"
        config.write_text(f'[cluster]\nshared_secret = "{SECRET}"\n')
        config.chmod(0o600)
        yield agents, urls, config
    finally:
        for agent in agents:
            if getattr(agent, "_server", None) is not None:
                agent._server.stop()
            agent.workers.close()


@pytest.fixture
def agent(tmp_path):
    # Workers without a model process here. Where the default (model process) path is covered: through the agent,
    # test_a_spare_worker_takes_the_next_instance_and_is_replaced; a load into shared memory (what a model process
    # shares), store/tests/test_shared_memory.py::test_a_file_the_page_cache_holds_is_read_not_mapped; a corrupt or
    # cut copy, store/tests/test_errors.py::test_flipped_byte_raises_checksum_mismatch and
    # ::test_file_shrinking_under_the_reader_is_truncation; a folder that is no converted checkpoint,
    # worker/tests/test_cli.py::test_a_folder_that_is_not_a_converted_checkpoint_exits_with_the_loader_error.
    a = make_agent(tmp_path, gpus=2, model_process=False)
    yield a
    a.workers.stop_all(timeout=5)
    a.workers.close()


@pytest.fixture
def client(agent):
    return create_app(agent).test_client()


def wait_for(predicate, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stand_in_workers(agent) -> None:
    """The agent's workers become processes that only wait (no imports, no load), for tests that never talk to them:
    their instances stay loading until stopped."""
    import sys

    agent.workers._command = lambda req, path, url_file: [sys.executable, "-c", "import time; time.sleep(60)"]


def ready_spare(agent):
    """The agent's one spare worker, once it has done its imports (it then takes the next instance)."""
    agent.workers.ensure_spares()
    [spare] = agent.workers._spares
    wait_for(lambda: "spare worker ready" in spare.log_path.read_text(), what="the spare's imports")
    return spare


def test_every_call_needs_the_shared_secret(client):
    for method, path in [("get", "/health"), ("get", "/v1/internal/instances"), ("post", "/v1/internal/instances"),
                         ("get", "/v1/internal/cache"), ("delete", "/v1/internal/instances/x")]:
        resp = getattr(client, method)(path)
        assert resp.status_code == 401, path
        assert "X-Hpcllm-Secret" in resp.get_json()["error"]["message"]
    assert client.get("/health", headers={SECRET_HEADER: "wrong"}).status_code == 401
    assert client.get("/health", headers=AUTH).get_json()["status"] == "ok"


def test_bad_instance_requests_say_what_to_fix(client, converted, tmp_path):
    resp = client.post("/v1/internal/instances", json={"model": "m", "source": str(converted), "gpu_ids": [5]},
                       headers=AUTH)
    assert resp.status_code == 400 and "do not exist" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/instances", json={"model": "m", "source": str(tmp_path / "nope")}, headers=AUTH)
    assert resp.status_code == 400 and "does not exist" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/internal/instances", json={"model": "bad name!", "source": "x"}, headers=AUTH)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "model"
    resp = client.post("/v1/internal/instances", data="not json", headers=AUTH)
    assert resp.status_code == 400
    assert client.delete("/v1/internal/instances/nope", headers=AUTH).status_code == 404


def test_registration_reports_measurements_gpus_and_cache(agent, converted):
    agent.cache.warm("tiny-llama", converted, "nvme")
    reg = agent.registration()
    assert reg.gpus == 2
    assert reg.tiers.nvme.read_gbps == 2.0 and reg.tiers.nvme.scope == "persistent"
    assert reg.tiers.sharedfs.read_gbps == 1.0 and reg.tiers.dram.read_gbps == 20.0
    assert [(c.model, c.tier) for c in reg.cached] == [("tiny-llama", "nvme")]
    assert reg.job_scoped is False


def test_job_scoped_nvme_and_per_node_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    a = make_agent(tmp_path, nvme_scope="job")
    reg = a.registration()
    assert (reg.node_id, reg.slurm_job_id, reg.job_scoped, reg.tiers.nvme.scope) == ("n7", "123", True, "job")
    assert a.nvme_dir == tmp_path / "nvme-n7"
    assert expand_node_pattern("/scratch/%j/%n", "n1", None) == "/scratch/nojob/n1"
    a.workers.close()


@pytest.mark.parametrize("setting", ["nvme_dir", "dram_namespace"])
def test_a_node_folder_naming_a_variable_that_is_not_set_is_refused(tmp_path, monkeypatch, setting):
    """node.nvme_dir = "$LOCAL_SCRATCH/hpcllm" where $LOCAL_SCRATCH is not set: the agent refuses to start, naming
    the setting and the variable (it cached into a folder literally named "$LOCAL_SCRATCH", in its current folder)."""
    from hpcllm.errors import ConfigError
    from hpcllm.node.agent import make_cache_manager

    monkeypatch.delenv("HPCLLM_TEST_LOCAL_SCRATCH", raising=False)
    monkeypatch.chdir(tmp_path)
    value = "$HPCLLM_TEST_LOCAL_SCRATCH/hpcllm" if setting == "nvme_dir" else "${HPCLLM_TEST_LOCAL_SCRATCH}"
    with pytest.raises(ConfigError,
                       match=rf"node.{setting} = .* uses \$\{{?HPCLLM_TEST_LOCAL_SCRATCH\}}?, which is not set"):
        if setting == "nvme_dir":
            make_agent(tmp_path, nvme_dir=value).workers.close()
        else:
            make_cache_manager(parse_config({"node": {"dram_namespace": value}}), tmp_path / "nvme", "n1", None)
    assert not any("$" in p.name for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("written", ["${HPCLLM-TEST-SCRATCH}", "${}"])
def test_a_node_folder_naming_a_variable_no_environment_can_hold_is_refused(tmp_path, monkeypatch, written):
    """os.path.expandvars reads "${A-B}" and "${}" as variables too and, none being set (no variable can have such a
    name), leaves them as they are: refused like any unset variable, not taken as a folder of that name."""
    import re

    from hpcllm.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"node.nvme_dir = .* uses {re.escape(written)}, which is not set"):
        make_agent(tmp_path, nvme_dir=str(tmp_path / written / "nvme")).workers.close()


def test_instance_loads_from_the_cached_copy_serves_and_stops(agent, client, converted, tiny_llama_dir):
    agent.cache.warm("tiny-llama", converted, "nvme")
    # The controller passes the deployed context length; the worker serves with it (not its own 512).
    body = {"model": "tiny-llama", "source": str(converted), "max_model_len": 256}
    resp = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    started = resp.get_json()
    assert started["load_tier"] == "nvme"
    iid = started["instance_id"]

    def ready():
        [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
        assert info["state"] in ("loading", "ready"), info
        return info if info["state"] == "ready" else None

    info = wait_for(ready, what="the worker to become ready")
    assert info["load_tier"] == "nvme" and info["load_seconds"] > 0 and info["worker_url"].startswith("http://")
    # The copy is in use while the instance runs: an eviction is refused.
    [copy] = client.get("/v1/internal/cache", headers=AUTH).get_json()["cached"]
    assert copy["in_use"] == 1
    assert client.delete("/v1/internal/cache/tiny-llama", headers=AUTH).status_code == 409

    with WorkerClient(info["worker_url"], SECRET) as worker:
        assert worker.ready()["max_model_len"] == 256
    # The worker serves greedy tokens equal to transformers' generate.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer("hello world", return_tensors="pt").input_ids
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
    with WorkerClient(info["worker_url"], SECRET) as worker:
        with worker.generate(GenerateRequest(request_id="r1", prompt_token_ids=prompt[0].tolist(), max_tokens=6,
                                             temperature=0)) as stream:
            tokens = [line.token_id for line in stream if line.type == "token"]
    assert tokens == expected[:len(tokens)] and len(tokens) >= 1

    # After a prompt long enough to time, the heartbeat's InstanceInfo carries the measured prefill rate (the
    # controller's migration-cost input) and no tokens in flight once the request is done.
    with WorkerClient(info["worker_url"], SECRET) as worker:
        with worker.generate(GenerateRequest(request_id="r2", prompt_token_ids=prompt[0].tolist() * 12,
                                             max_tokens=2, temperature=0)) as stream:
            assert [line for line in stream if line.type == "token"]
    agent.workers.refresh(agent.workers.get(iid))
    [beat] = [i for i in agent.workers.infos() if i.instance_id == iid]
    assert beat.prefill_tokens_per_second > 0 and beat.tokens_in_flight == 0, beat

    stopped = client.delete(f"/v1/internal/instances/{iid}", headers=AUTH)
    assert stopped.status_code == 200 and stopped.get_json()["state"] == "stopped"
    assert client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"] == []
    [copy] = client.get("/v1/internal/cache", headers=AUTH).get_json()["cached"]
    assert copy["in_use"] == 0
    evicted = client.delete("/v1/internal/cache/tiny-llama?tier=nvme", headers=AUTH)
    assert evicted.status_code == 200 and [c["model"] for c in evicted.get_json()["cached"]] == ["tiny-llama"]


def model_processes(pid: int) -> set[int]:
    """The live processes pid spawned with multiprocessing (the model process; not its resource tracker), from
    /proc: the field after the command in /proc/N/stat is the parent."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and spawned:
            children.add(int(stat.parent.name))
    return children


def test_a_spare_worker_takes_the_next_instance_and_is_replaced(tmp_path, converted, tiny_llama_dir):
    agent = make_agent(tmp_path, spare_workers=1)  # worker.model_process "auto": CPU workers use one
    client = create_app(agent).test_client()
    try:
        spare = ready_spare(agent)
        # The spare starts its model process while it waits: the worker it becomes keeps that one.
        wait_for(lambda: model_processes(spare.process.pid), what="the spare's model process")
        [model_process] = model_processes(spare.process.pid)

        resp = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted)},
                           headers=AUTH)
        assert resp.status_code == 202, resp.get_json()
        inst = agent.workers.get(resp.get_json()["instance_id"])
        assert inst.process.pid == spare.process.pid  # no fresh process: the spare became the worker
        wait_for(lambda: inst.state == "ready", what="the spare to serve the model")
        assert "spare worker ready" in inst.log_path.read_text() and not spare.log_path.exists()
        assert model_processes(inst.process.pid) == {model_process}

        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        prompt = AutoTokenizer.from_pretrained(tiny_llama_dir)("hello world", return_tensors="pt").input_ids
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False)[0, prompt.shape[1]:].tolist()
        cpu_share = max(1, len(os.sched_getaffinity(0)) // 2)  # cpu_slots_per_node = 2: half the CPUs each
        with WorkerClient(inst.worker_url, SECRET) as worker:
            with worker.generate(GenerateRequest(request_id="r1", prompt_token_ids=prompt[0].tolist(), max_tokens=5,
                                                 temperature=0)) as stream:
                assert [line.token_id for line in stream if line.type == "token"] == expected
            assert worker.ready()["torch_threads"] == cpu_share

        # Once the load is done a new spare waits; a spare that died is skipped for a fresh worker.
        [replacement] = agent.workers._spares
        assert replacement.process.pid != spare.process.pid
        replacement.process.kill()
        replacement.process.wait()
        resp = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted)},
                           headers=AUTH)
        second = agent.workers.get(resp.get_json()["instance_id"])
        agent.config.node.spare_workers = 0  # no spare after this load: nothing would take it
        assert second.process.pid != replacement.process.pid
        wait_for(lambda: second.state == "ready", what="a fresh worker after the dead spare")
        with WorkerClient(second.worker_url, SECRET) as worker:
            assert worker.ready()["torch_threads"] == cpu_share
    finally:
        agent.drain()
        agent.workers.close()
    spares_left = list(agent.workers.run_dir.glob("spare-*.log"))
    # no spare waits here (spare_workers = 0 for the last load): a drain retiring a waiting spare and its log is
    # checked in test_a_spare_that_dies_while_idle_or_after_a_long_load_is_replaced_at_the_next_heartbeat
    assert agent.workers._spares == [] and spares_left == [], "nothing of a spare is left after the drain"


def kill_the_spare_and_beat(agent) -> None:
    """The agent's one spare killed (the OOM killer, an admin), then one turn of its heartbeat thread."""
    [spare] = agent.workers._spares
    spare.process.kill()
    spare.process.wait()
    agent.beat()


def test_a_spare_that_dies_at_once_again_is_not_restarted_at_every_heartbeat(tmp_path, caplog):
    """A spare that cannot live (a broken environment, too little memory for its host pool) would be started at every
    heartbeat, taking the CPU and host memory each time and keeping the read sweep waiting: the second quick death
    in a row backs the restarts off (30 s, doubling)."""
    agent = make_agent(tmp_path, spare_workers=1, model_process=False)
    try:
        agent.workers.ensure_spares()
        for _ in range(2):  # the first quick death is replaced at once (a one-off: the OOM killer)
            kill_the_spare_and_beat(agent)
        starts = agent.workers.starts
        agent.beat()
        assert agent.workers._spares == [] and agent.workers.starts == starts == 2
        assert "2 spare workers in a row died" in caplog.text and "next starts in 30 s" in caplog.text
    finally:
        agent.drain()
        agent.workers.close()


def test_a_spare_that_dies_while_idle_or_after_a_long_load_is_replaced_at_the_next_heartbeat(tmp_path, monkeypatch):
    """A spare killed while it waits (the OOM killer, an admin) is replaced before a start needs it: the next start
    would otherwise pay a fresh worker's imports. The heartbeat starts no spare while a worker loads, but still sees
    the spare alive past its imports: if it dies once the load ended (the OOM killer), that is no quick death, even
    after an earlier one, so it is replaced at once rather than backed off."""
    agent = make_agent(tmp_path, spare_workers=1, model_process=False)
    try:
        agent.workers.ensure_spares()
        [first] = agent.workers._spares
        kill_the_spare_and_beat(agent)  # one heartbeat (the controller unreachable here: logged, and it goes on)
        [spare] = agent.workers._spares
        assert spare.process.pid != first.process.pid and spare.process.poll() is None, \
            "a spare that died while idle is replaced at the next heartbeat"
        spare.started_at -= 60  # a long load: the spare lives on past its imports
        monkeypatch.setattr(agent.workers, "loading", lambda: True)
        agent.beat()
        monkeypatch.undo()
        kill_the_spare_and_beat(agent)
        [replacement] = agent.workers._spares
        assert replacement.process.pid != spare.process.pid and replacement.process.poll() is None, \
            "a spare that died after a long load is replaced at once, not backed off"
        agent.drain()
        assert agent.workers._spares == [] and not list(agent.workers.run_dir.glob("spare-*.log")), \
            "the drain retires the waiting spare and removes its log"
    finally:
        agent.drain()
        agent.workers.close()


def test_a_spare_that_cannot_start_does_not_cost_the_heartbeat(tmp_path, monkeypatch, caplog):
    """The controller declares a node lost whose heartbeats stop: a spare's start failing (any error) at every beat
    must not skip them."""
    from hpcllm.errors import HpcllmError

    agent = make_agent(tmp_path, spare_workers=1)
    sent = []
    monkeypatch.setattr(agent, "heartbeat", lambda: sent.append(True))

    def broken_spare():
        raise HpcllmError("the worker's environment cannot be built")

    monkeypatch.setattr(agent.workers, "_spawn_spare", broken_spare)
    try:
        agent.beat()
        assert sent == [True] and agent.workers._spares == []
        assert "cannot start a spare worker" in caplog.text
    finally:
        agent.drain()
        agent.workers.close()


def test_spares_failing_for_days_back_off_at_the_cap(tmp_path, monkeypatch, caplog):
    """A broken environment nobody mends: after a thousand failed spare starts (15 min apart: ten days) the back-off
    stays at its cap, no overflow ending the heartbeat's turn."""
    from hpcllm.errors import HpcllmError

    agent = make_agent(tmp_path, spare_workers=1)

    def broken_spare():
        raise HpcllmError("the worker's environment cannot be built")

    monkeypatch.setattr(agent.workers, "_spawn_spare", broken_spare)
    agent.workers._quick_spare_deaths = 1100
    try:
        agent.beat()
        assert "1101 spare workers in a row died" in caplog.text and "next starts in 900 s" in caplog.text
    finally:
        agent.drain()
        agent.workers.close()


def test_a_tensor_parallel_start_on_mig_slices_is_refused_saying_why(tmp_path, converted):
    """CUDA shows a process one MIG device only: ranks given MIG slices would all share the first one (or fail)."""
    from hpcllm.node.gpus import GpuInventory

    agent = make_agent(tmp_path, gpus=2)
    agent.workers.gpus = GpuInventory(("MIG-a1b2", "MIG-c3d4"), "CUDA_VISIBLE_DEVICES")
    client = create_app(agent).test_client()
    try:
        resp = client.post("/v1/internal/instances", headers=AUTH, json={
            "model": "tiny-llama", "source": str(converted), "gpu_ids": [0, 1], "tensor_parallel": 2})
        assert resp.status_code == 400, resp.get_json()
        message = resp.get_json()["error"]["message"]
        assert "MIG slices (MIG-a1b2, MIG-c3d4)" in message and "tensor_parallel = 1" in message
        assert agent.workers.instances() == [] and agent.workers.gpus_in_use() == set()
    finally:
        agent.drain()
        agent.workers.close()


def test_no_spare_starts_at_a_heartbeat_while_a_worker_loads(tmp_path, converted):
    """Its imports would compete with the load for the CPU: a spare the load took is replaced when it ends."""
    agent = make_agent(tmp_path, spare_workers=0)
    stand_in_workers(agent)
    try:
        inst = agent.workers.start(StartInstance(model="tiny-llama", source=str(converted)))
        agent.config.node.spare_workers = 1  # as if the load had taken the node's spare
        agent.beat()
        assert inst.state == "loading" and agent.workers._spares == [] and agent.workers.starts == 1
    finally:
        agent.drain()
        agent.workers.close()


@pytest.mark.gpu
@pytest.mark.parametrize("spare_workers", [0, 1], ids=["fresh-worker", "spare-worker"])
def test_a_gpu_instance_serves_on_its_gpu(tmp_path, converted, tiny_llama_dir, spare_workers):
    """The GPU path of an instance: CUDA_VISIBLE_DEVICES narrowed to its GPU, through a fresh worker and through a
    spare (which must not have initialised CUDA before its assignment)."""
    agent = make_agent(tmp_path, gpus=1, spare_workers=spare_workers)
    client = create_app(agent).test_client()
    try:
        if spare_workers:
            spare = ready_spare(agent)
        resp = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted),
                                                           "gpu_ids": [0]}, headers=AUTH)
        assert resp.status_code == 202, resp.get_json()
        inst = agent.workers.get(resp.get_json()["instance_id"])
        assert (inst.process.pid == spare.process.pid) if spare_workers else True
        wait_for(lambda: inst.state in ("ready", "failed"), what="the GPU worker to load")
        assert inst.state == "ready", f"{inst.error}\n{inst.log_path.read_text()[-3000:]}"
        assert model_processes(inst.process.pid) == set()  # a GPU worker has no model process (the spare's stopped)

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to("cuda").eval()
        prompt = AutoTokenizer.from_pretrained(tiny_llama_dir)("hello world", return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
        with WorkerClient(inst.worker_url, SECRET) as worker:
            assert worker.ready()["device"] == "cuda:0"
            with worker.generate(GenerateRequest(request_id="g1", prompt_token_ids=prompt[0].tolist(), max_tokens=8,
                                                 temperature=0)) as stream:
                assert [line.token_id for line in stream if line.type == "token"] == expected.tolist()
    finally:
        agent.drain()
        agent.workers.close()


def test_each_worker_gets_its_share_of_the_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # Slurm bound the job to 16 CPUs
    agent = make_agent(tmp_path, gpus=4)
    assert agent.workers.threads_for([]) == 8  # two CPU slots per node share them
    assert agent.workers.threads_for([0]) == 4 and agent.workers.threads_for([1, 2, 3]) == 12  # GPUs' fraction
    agent.config.worker.cpu_threads = 3
    assert agent.workers.threads_for([]) == 3 == agent.workers.threads_for([0])
    agent.workers.close()


def test_a_crashing_worker_is_reported_failed_with_its_error(agent, client, tmp_path):
    """An origin folder that is no converted checkpoint: the worker exits at once, and the agent reports the
    instance failed over the API with the exit status (no cached copy is involved)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    resp = client.post("/v1/internal/instances", json={"model": "broken", "source": str(broken)}, headers=AUTH)
    assert resp.status_code == 202

    def failed():
        [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
        return info if info["state"] == "failed" else None

    info = wait_for(failed, what="the broken worker to be reported failed")
    assert "exited with status" in info["error"]
    assert client.delete(f"/v1/internal/instances/{info['instance_id']}", headers=AUTH).status_code == 200


def test_gpus_are_not_given_twice(agent, client, converted):
    stand_in_workers(agent)  # the first instance's worker is never talked to
    body = {"model": "tiny-llama", "source": str(converted), "gpu_ids": [1]}
    first = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert first.status_code == 202
    second = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert second.status_code == 409 and "GPUs [1]" in second.get_json()["error"]["message"]


def test_drain_refuses_new_instances_stops_workers_and_is_idempotent(agent, client, converted):
    stand_in_workers(agent)  # the drain stops a loading worker's process, never talked to
    resp = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted)}, headers=AUTH)
    inst = agent.workers.get(resp.get_json()["instance_id"])
    drains = [threading.Thread(target=agent.drain) for _ in range(2)]
    for t in drains:
        t.start()
    for t in drains:
        t.join(30)
    assert inst.process.poll() is not None
    assert agent.workers.instances() == []
    assert agent.state == "stopped"
    agent.drain()  # a repeated signal: nothing more happens
    again = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted)}, headers=AUTH)
    assert again.status_code == 503 and "draining" in again.get_json()["error"]["message"]


def test_drain_signal_and_sigterm_request_one_drain(agent):
    agent.install_signal_handlers()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert agent._drain_requested.is_set()
        signal.raise_signal(signal.SIGTERM)  # the repeat of a drain: no error, still one drain
        agent.drain()
        assert agent.state == "stopped"
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_corrupt_or_cut_short_cached_copy_fails_the_load_reported_with_its_error_and_is_refilled(
        agent, client, converted):
    """Two broken NVMe copies, one after the other, each a worker that exits with its error, reported failed over
    the API (one worker start per failure): a flipped byte - the load
    stops on the checksum (exit 4, never serves garbage) -, then a data file cut short after the agent chose the
    copy (the start's size check passed) - the load stops with TruncatedFile (exit 3, a CheckpointError). Each
    time the agent drops the copy and refills it from the origin (never touched), and the next instance loads from
    the refilled copy and becomes ready."""
    copy = agent.cache.warm("tiny-llama", converted, "nvme")
    data_file = sorted(Path(copy.path).glob("data-*.h5"))[0]
    index = json.loads((Path(copy.path) / "index.json").read_text())
    first_tensor = min(index["tensors"].values(), key=lambda t: t["offset"])
    with open(data_file, "r+b") as f:  # flip one byte inside the first tensor's data
        f.seek(first_tensor["offset"])
        byte = f.read(1)
        f.seek(first_tensor["offset"])
        f.write(bytes([byte[0] ^ 0xFF]))

    resp = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted)}, headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    iid = resp.get_json()["instance_id"]

    def failed():
        [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
        assert info["state"] != "ready", "a corrupt copy must never serve"
        return info if info["state"] == "failed" else None

    info = wait_for(failed, what="the load from the corrupt copy to fail")
    assert "exited with status 4" in info["error"], info["error"]
    agent.workers.get(iid).done.wait(30)

    refilled = agent.cache.get("tiny-llama", "nvme")
    assert refilled is not None and refilled.verified
    assert data_file.read_bytes() == (converted / data_file.name).read_bytes()
    assert client.delete(f"/v1/internal/instances/{iid}", headers=AUTH).status_code == 200  # a failed one too

    # The refilled copy cut short while the next worker loads from it.
    start = StartInstance(model="tiny-llama", source=str(converted))
    inst = agent.workers.start(start)
    assert inst.tier == "nvme"
    data_file = sorted(inst.path.glob("data-*.h5"))[0]
    os.truncate(data_file, data_file.stat().st_size // 2)  # the fresh worker is still importing: it reads it cut

    wait_for(lambda: inst.state == "failed", what="the load from the cut copy to fail")
    assert "exited with status 3" in inst.error and "the copy is incomplete" in inst.error, inst.error
    assert inst.done.wait(60)

    refilled = agent.cache.get("tiny-llama", "nvme")
    assert refilled is not None and refilled.verified and refilled.in_use == 0
    assert data_file.read_bytes() == (converted / data_file.name).read_bytes()
    agent.workers.stop(inst.instance_id)

    again = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(converted)}, headers=AUTH)
    assert again.status_code == 202 and again.get_json()["load_tier"] == "nvme"

    def ready():
        infos = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
        return any(i["state"] == "ready" for i in infos)

    wait_for(ready, what="an instance from the refilled copy to become ready")


def test_heartbeats_name_the_node_of_every_rank_of_a_tensor_parallel_instance(tmp_path, monkeypatch):
    from hpcllm.controller.protocol import InstanceInfo

    agent = make_agent(tmp_path)
    agent.node_id = "n3"
    monkeypatch.setattr(agent.workers, "listing", lambda: ([
        InstanceInfo(instance_id="a", model="m", state="ready", tensor_parallel=2),
        InstanceInfo(instance_id="b", model="m", state="ready")], 2))
    infos, _ = agent.instance_listing()
    assert [(i.tensor_parallel, i.rank_nodes) for i in infos] == [(2, ["n3", "n3"]), (1, ["n3"])]
    agent.workers.close()


def test_a_tensor_parallel_instance_reports_where_each_rank_loaded_and_its_slowest_tier():
    """The lead's /ready says which ranks read their node's slice copy (hpcllm worker --tensor-parallel): the
    heartbeat names each rank's node and tier, and the instance's tier is the slowest any rank read from."""
    from hpcllm.node.workers import Instance

    inst = Instance("i", "m", "/shared/m", Path("/shared/m"), "sharedfs", [], None, Path("u"), Path("l"), 0.0,
                    ranks=2, nodes=2)
    assert (inst.info().rank_tiers, inst.info().load_tier) == ([], "sharedfs")  # not loaded yet
    inst.rank_loads = [{"rank": 0, "node": "n1", "slice_copy": True}, {"rank": 1, "node": "n2", "slice_copy": False}]
    info = inst.info()
    assert (info.rank_nodes, info.rank_tiers, info.load_tier) == (["n1", "n2"], ["nvme", "sharedfs"], "sharedfs")
    inst.rank_loads[1]["slice_copy"] = True
    assert (inst.info().rank_tiers, inst.info().load_tier) == (["nvme", "nvme"], "nvme")


def test_a_token_agent_holds_a_call_that_comes_before_its_node_key_and_then_serves_it(tmp_path, monkeypatch):
    """The controller counts a node registered (and a waiting cold start may call it) a moment before its answer,
    with the node key, reaches the agent: that call waits for the key instead of getting 401."""
    import hpcllm.node.app as agent_app

    key = node_key(SECRET, "pool-token", "n1")
    a = make_agent(tmp_path)
    try:
        a.workers.set_key(None)  # a token agent, registering
        client = create_app(a).test_client()
        monkeypatch.setattr(agent_app, "KEY_WAIT_SECONDS", 0.2)
        refused = create_app(a).test_client().get("/v1/internal/instances", headers={SECRET_HEADER: key})
        assert refused.status_code == 401 and "no key yet" in refused.get_json()["error"]["message"]
        monkeypatch.setattr(agent_app, "KEY_WAIT_SECONDS", 30.0)
        answers = []
        caller = threading.Thread(target=lambda: answers.append(
            client.get("/v1/internal/instances", headers={SECRET_HEADER: key})))
        caller.start()
        time.sleep(0.3)
        assert not answers  # still waiting for the registration's answer
        a.workers.set_key(key)
        caller.join(10)
        assert answers[0].status_code == 200
        assert client.get("/v1/internal/instances", headers={SECRET_HEADER: SECRET}).status_code == 401
    finally:
        a.workers.close()


def test_a_token_agent_refuses_a_call_without_a_node_key_at_once_while_it_waits_for_its_own(tmp_path, monkeypatch):
    """Until a token agent has its node key, every call waited up to KEY_WAIT_SECONDS for it, credential or not:
    a burst of unauthenticated requests (a port scanner, a health probe) held the agent's threads (node.threads)
    and delayed the controller's own calls. A call that cannot carry a node key is refused at once."""
    import hpcllm.node.app as agent_app

    key = node_key(SECRET, "pool-token", "n1")
    monkeypatch.setattr(agent_app, "KEY_WAIT_SECONDS", 600.0)  # the key is held back until the test gives it
    a = make_agent(tmp_path)
    try:
        a.workers.set_key(None)  # a token agent, registering
        client = create_app(a).test_client()
        held = []
        waiting = threading.Thread(target=lambda: held.append(
            client.get("/v1/internal/instances", headers={SECRET_HEADER: key})))
        waiting.start()
        refused = []
        for headers in ({}, {SECRET_HEADER: ""}, {SECRET_HEADER: "probe"}, {SECRET_HEADER: key.upper()}):
            caller = threading.Thread(target=lambda h=headers: refused.append(client.get("/health", headers=h)))
            caller.start()
            caller.join(60)
            assert not caller.is_alive(), f"a call with {headers} waits for the node key"
        assert [r.status_code for r in refused] == [401] * 4
        assert "no key yet" in refused[0].get_json()["error"]["message"]
        assert not held and waiting.is_alive()  # the call with a node key's form still waits for the key
        a.workers.set_key(key)  # the registration's answer
        waiting.join(60)
        assert held[0].status_code == 200, held[0].get_data(as_text=True)
    finally:
        a.workers.set_key(SECRET)  # a failed test's waiting call ends
        a.workers.close()


@pytest.mark.parametrize("threads, waiting", [(16, 4), (4, 1), (1, 1)])
def test_a_token_agent_holds_only_a_few_calls_with_a_node_key_form_while_it_waits_for_its_own(
        tmp_path, monkeypatch, threads, waiting):
    """A call with anything of a node key's form (64 lower-case hex digits) waited up to KEY_WAIT_SECONDS for the
    key: a few such made-up credentials sent while the agent registers took every one of its threads (node.threads)
    and held the controller's calls behind them. Only KEY_WAITERS calls wait, at most a quarter of node.threads (at
    least one: 4 waiting calls held all of 4 threads); the next is refused at once."""
    import hpcllm.node.app as agent_app

    key = node_key(SECRET, "pool-token", "n1")
    monkeypatch.setattr(agent_app, "KEY_WAIT_SECONDS", 600.0)  # the key is held back until the test gives it
    a = make_agent(tmp_path, threads=threads)
    try:
        a.workers.set_key(None)  # a token agent, registering
        waiting_for_key = []
        key_within = a.workers.key_within

        def counted_key_within(seconds):
            if seconds:
                waiting_for_key.append(seconds)
            return key_within(seconds)

        monkeypatch.setattr(a.workers, "key_within", counted_key_within)
        client = create_app(a).test_client()
        fakes = [f"{n:064x}" for n in range(waiting + 1)]
        held = []
        waiters = [threading.Thread(target=lambda f=fake: held.append(
            client.get("/health", headers={SECRET_HEADER: f}))) for fake in fakes[:-1]]
        for waiter in waiters:
            waiter.start()
        wait_for(lambda: len(waiting_for_key) == len(waiters), what="the first calls to wait for the node key")
        refused = []
        caller = threading.Thread(target=lambda: refused.append(
            client.get("/health", headers={SECRET_HEADER: fakes[-1]})))
        caller.start()
        caller.join(60)
        assert not caller.is_alive(), f"a call past the first {waiting} waits for the node key too"
        assert refused[0].status_code == 401 and "no key yet" in refused[0].get_json()["error"]["message"]
        assert not held and all(w.is_alive() for w in waiters)
        a.workers.set_key(key)  # the registration's answer: the made-up keys are wrong, the real one serves
        for waiter in waiters:
            waiter.join(60)
        assert [r.status_code for r in held] == [401] * len(waiters)
        assert client.get("/health", headers={SECRET_HEADER: key}).status_code == 200
    finally:
        a.workers.set_key(SECRET)  # a failed test's waiting calls end
        a.workers.close()


@pytest.mark.parametrize("url", ["abc", "controller:8700", "http://", "http://host:0"])
def test_a_malformed_controller_url_is_refused_at_start_not_retried(url, monkeypatch):
    from hpcllm.errors import ConfigError
    from hpcllm.node.agent import controller_url_of

    monkeypatch.delenv("HPCLLM_CONTROLLER_URL", raising=False)
    with pytest.raises(ConfigError, match=f"the controller URL .* {url!r} is not a URL like http://HOST:PORT"):
        controller_url_of(parse_config({}), url)
    with pytest.raises(ConfigError, match="is not a URL"):
        controller_url_of(parse_config({"node": {"controller_url": url}}))
    assert controller_url_of(parse_config({}), "https://ctl.example:8700/") == "https://ctl.example:8700"
