"""Tensor-parallel instances started by the node agent: `mpirun -n 2 ... hpcllm worker --tensor-parallel` behind the
agent's HTTP API (real ranks, the tiny dev Llama: 4 heads, 2 KV heads)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from hpcllm.checkpoint import ChecksumMismatch, read_checkpoint
from hpcllm.checkpoint.converter import convert
from hpcllm.credentials import issue_ticket
from hpcllm.node.app import create_app
from hpcllm.node.cache import slice_key
from hpcllm.node.protocol import StartInstance
from hpcllm.node.tests.test_agent import AUTH, SECRET, make_agent, wait_for
from hpcllm.node.workers import InstanceError, descendants, processes, running
from hpcllm.tp.slicecache import open_slice_copy, verify_slice_copy
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def tp_converted(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tp-llama"
    convert(tiny_llama_dir, out, progress=False, chunk_size=16384)
    return out


@pytest.fixture
def agent(tmp_path):
    a = make_agent(tmp_path, gpus=0)
    yield a
    a.workers.stop_all(timeout=10)
    a.workers.close()


@pytest.fixture
def client(agent):
    return create_app(agent).test_client()


def ranks_of(mpirun_pid: int) -> list:
    """The `hpcllm worker --tensor-parallel` processes under the instance's mpirun (workers.Process records)."""
    return processes([pid for pid in descendants(mpirun_pid)
                      if b"--tensor-parallel" in Path(f"/proc/{pid}/cmdline").read_bytes()])


def instance(client) -> dict:
    [info] = client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
    return info


def test_a_two_rank_instance_serves_greedy_tokens_live_migrates_a_stream_and_stops_every_rank(
        agent, client, tp_converted, tiny_llama_dir, tmp_path):
    """One 2-rank instance (and a 1-rank one to migrate to) for what its ranks serve, in order:
    - transformers' greedy tokens, also for a prompt prefilled over several steps that keep no logits (the output
      projection's all-gather of zero rows), for a request reusing the ranks after the first's KV blocks were freed
      and for concurrent requests sharing each step's batched forward on every rank (the batched engine's StepBatch);
    - the worker API of a TP instance is the same as one rank's: migrate-out moves a running greedy stream (its
      tokens) to the 1-rank instance, which finishes it exactly like an uninterrupted run;
    - the drain signal leaves every rank serving; the stop ends every rank, exit status 0."""
    from hpcllm.worker.protocol import FinalLine, TokenLine

    config = tmp_path / "hpcllm.toml"
    config.write_text(f'[cluster]\nshared_secret = "{SECRET}"\n[worker]\nprefill_chunk_tokens = 4\n')  # two steps
    config.chmod(0o600)
    agent.config_path = agent.workers.config_path = config  # the workers' config, as the agent passes its own

    def start(ranks: int) -> str:
        resp = client.post("/v1/internal/instances", headers=AUTH, json={
            "model": "tp-llama", "source": str(tp_converted), "tensor_parallel": ranks})
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()["instance_id"]

    def ready(iid: str):
        info = next(i for i in client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
                    if i["instance_id"] == iid)
        assert info["state"] in ("loading", "ready"), info
        return info if info["state"] == "ready" else None

    iid, destination_id = start(2), start(1)  # both load at once
    info = wait_for(lambda: ready(iid), timeout=240, what="the two-rank instance to become ready")
    process = agent.workers.get(iid).process
    assert process.args[:3] == ["mpirun", "-n", "2"]
    ranks = ranks_of(process.pid)
    assert len(ranks) == 2  # both ranks run under the instance's mpirun

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt = AutoTokenizer.from_pretrained(tiny_llama_dir)("hello world, this", return_tensors="pt").input_ids
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()

    def greedy(request_id: str) -> list[int]:
        with WorkerClient(info["worker_url"], SECRET) as worker:
            with worker.generate(GenerateRequest(request_id=request_id, prompt_token_ids=prompt[0].tolist(),
                                                 max_tokens=12, temperature=0)) as stream:
                return [line.token_id for line in stream if line.type == "token"]

    assert prompt.shape[1] > 4  # prefilled over several steps
    for request_id in ("first", "second"):
        assert greedy(request_id) == expected
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(greedy, ("a", "b", "c"))) == [expected] * 3

    # Live migration of a running stream to the 1-rank instance.
    source_url = info["worker_url"]
    destination_url = wait_for(lambda: ready(destination_id), timeout=240, what="the 1-rank destination")["worker_url"]
    request = GenerateRequest(request_id="moving", prompt="hello world, this", max_tokens=150, ignore_eos=True,
                              temperature=0)
    with WorkerClient(destination_url, SECRET) as destination:
        with destination.generate(request.model_copy(update={"request_id": "reference"})) as stream:
            reference = [line.token_id for line in stream if isinstance(line, TokenLine)]

    with WorkerClient(source_url, SECRET) as source, WorkerClient(destination_url, SECRET) as destination:
        with source.generate(request) as stream:
            lines = iter(stream)
            received = [next(lines) for _ in range(3)]
            ticket = issue_ticket(model="tp-llama", source_instance=iid, source_key=SECRET,
                                  destination_url=destination_url, destination_instance=destination_id,
                                  destination_key=SECRET)  # as the controller would
            outcome = agent.workers.migrate_out(iid, destination_url, timeout=60, ticket=ticket)
            received += list(lines)
        final = received.pop()
        assert isinstance(final, FinalLine) and final.finish_reason == "migrated", final
        assert [m.request_id for m in outcome.migrated] == ["moving"] and outcome.error is None, outcome
        with destination.attach(final.migrated_to.request_id, final.migrated_to.from_index) as attached:
            rest = list(attached)
    tokens = [line.token_id for line in received + rest if isinstance(line, TokenLine)]
    assert tokens == reference, "the migrated stream differs from an uninterrupted run"

    # The drain signal (Slurm's scancel --signal reaches every process of the job) leaves every rank serving: a
    # request both ranks step through after kill() returned finishes after both ranks got the signal.
    for rank in ranks:
        os.kill(rank.pid, signal.SIGUSR1)
    assert greedy("after-drain") == expected
    assert running(ranks) == ranks

    stopped = client.delete(f"/v1/internal/instances/{iid}", headers=AUTH).get_json()
    # A clean stop exits 0, as a single worker's: mpirun answered the SIGTERM it was sent with exit status 1 (and a
    # SIGKILL of ranks still shutting down after its short grace), even when every rank ended well.
    assert stopped["state"] == "stopped" and stopped["exit_code"] == 0, stopped
    assert running(ranks) == []  # no rank outlives its instance
    log = next(agent.workers.run_dir.glob(f"{iid}.log")).read_text()
    assert "rank 1: the lead stopped after" in log and "Traceback" not in log, log


def test_a_corrupt_slice_on_rank_1_fails_the_instance_naming_rank_1(agent, client, tp_converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tp_converted, broken)
    ckpt = read_checkpoint(broken)
    entry = ckpt.tensors["model.layers.1.mlp.down_proj.weight"]  # [64, 128]: rank 1 holds columns 64..127
    with open(ckpt.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + (5 * 128 + 100) * 4)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))

    resp = client.post("/v1/internal/instances", json={"model": "tp-llama", "source": str(broken),
                                                        "tensor_parallel": 2}, headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    mpirun = agent.workers.get(resp.get_json()["instance_id"]).process
    ranks = wait_for(lambda: len(ranks_of(mpirun.pid)) == 2 and ranks_of(mpirun.pid), timeout=60,
                     what="both ranks to start")

    info = wait_for(lambda: instance(client)["state"] == "failed" and instance(client), timeout=240,
                    what="the instance to fail")
    assert "rank 1: " in info["error"] and "model.layers.1.mlp.down_proj.weight strip 50/64 along dim 1 is corrupt" \
        in info["error"], info["error"]
    assert running(ranks) == [] and mpirun.poll() is not None


def test_a_corrupt_slice_copy_is_replaced_and_the_next_start_serves_from_both_ranks_slice_copies(
        agent, client, tp_converted, tiny_llama_dir, tmp_path):
    """`hpcllm cache warm --tensor-parallel 2` left both ranks' slice copies on this node; one byte of rank 1's
    flipped. The instance fails as a load on a corrupt copy (ChecksumMismatch's exit status) and the agent replaces
    that slice copy, as it replaces a single worker's corrupt copy (the ranks exited 1 and the agent replaced nothing:
    every later start failed on the same slices until `hpcllm cache verify`). The next start's ranks read their slices
    from their copies (one read per tensor), hold them in use while they run, and serve transformers' tokens."""
    config = tmp_path / "hpcllm.toml"  # the ranks find the agent's slice copies through node.nvme_dir
    config.write_text(f'[cluster]\nshared_secret = "{SECRET}"\n[node]\nnvme_dir = "{agent.cache.nvme_dir}"\n')
    config.chmod(0o600)
    agent.config_path = agent.workers.config_path = config  # as in production: the workers get the agent's config
    for rank in (0, 1):
        agent.cache.warm_slices("tp-llama", tp_converted, 2, rank)
    copy = open_slice_copy(agent.cache.nvme_path(slice_key("tp-llama", 2, 1)))
    piece = next(iter(copy.pieces.values()))
    with open(copy.data_path, "r+b") as f:
        f.seek(piece.offset + piece.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    body = {"model": "tp-llama", "source": str(tp_converted), "tensor_parallel": 2}

    resp = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    failed = agent.workers.get(resp.get_json()["instance_id"])
    assert failed.done.wait(240), "the instance with the corrupt slice copy did not end"
    assert failed.state == "failed" and f"worker exited with status {ChecksumMismatch.exit_code}: " in failed.error \
        and "rank 1: " in failed.error and str(copy.data_path) in failed.error, failed.error
    verify_slice_copy(tp_converted, agent.cache.nvme_path(slice_key("tp-llama", 2, 1)))  # refilled: good bytes
    client.delete(f"/v1/internal/instances/{failed.instance_id}", headers=AUTH)

    resp = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    iid = resp.get_json()["instance_id"]
    info = wait_for(lambda: instance(client)["state"] != "loading" and instance(client), timeout=240,
                    what="the next start to load")
    assert info["state"] == "ready", info
    assert info["tensor_parallel"] == 2 and info["rank_nodes"] == [agent.node_id] * 2
    assert [load["slice_copy"] for load in agent.workers.get(iid).rank_loads] == [True, True]
    # The lead reports how each rank loaded: both from their slice copies, so the instance loaded from NVMe
    # although the agent gave the ranks the origin's path.
    assert (info["rank_tiers"], info["load_tier"]) == (["nvme", "nvme"], "nvme"), info
    assert [c.in_use for c in agent.cache.list()] == [1, 1]  # each rank holds its copy

    log = next(agent.workers.run_dir.glob(f"{iid}.log")).read_text()
    for rank in (0, 1):
        rank_copy = agent.cache.nvme_path(slice_key("tp-llama", 2, rank))
        line = next(line for line in log.splitlines() if f"tensor-parallel rank {rank} on" in line)
        assert f"from its slice copy {rank_copy})" in line and " (0 bytes from" not in line, line

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt = AutoTokenizer.from_pretrained(tiny_llama_dir)("hello world", return_tensors="pt").input_ids
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    with WorkerClient(info["worker_url"], SECRET) as worker:
        with worker.generate(GenerateRequest(request_id="r1", prompt_token_ids=prompt[0].tolist(),
                                             max_tokens=8, temperature=0)) as stream:
            assert [line.token_id for line in stream if line.type == "token"] == expected
    client.delete(f"/v1/internal/instances/{iid}", headers=AUTH)
    assert [c.in_use for c in agent.cache.list()] == [0, 0]


def test_tensor_parallel_starts_this_node_cannot_run_are_refused(client, tp_converted, monkeypatch):
    body = {"model": "tp-llama", "source": str(tp_converted), "tensor_parallel": 2, "engine": "vllm"}
    resp = client.post("/v1/internal/instances", json=body, headers=AUTH)
    assert resp.status_code == 400 and "hpcllm's engine only" in resp.get_json()["error"]["message"]
    monkeypatch.setenv("PATH", "/nonexistent")
    resp = client.post("/v1/internal/instances", json={**body, "engine": "hpcllm"}, headers=AUTH)
    assert resp.status_code == 400 and "needs 'mpirun'" in resp.get_json()["error"]["message"]
    assert client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"] == []


def test_a_tensor_parallel_start_with_another_mpis_mpirun_is_refused_naming_it(client, tp_converted, tmp_path,
                                                                                  monkeypatch):
    """The agent launches the ranks with Open MPI's options (--mca, --oversubscribe) and stops them with a signal
    Open MPI's mpirun forwards: MPICH's mpirun (hydra) first on the PATH was started anyway (202), to fail or not
    stop later. Now the start is refused saying which mpirun it found and what to install; Open MPI's is accepted."""
    from hpcllm.node.workers import not_open_mpi

    assert not_open_mpi(shutil.which("mpirun")) is None
    hydra = tmp_path / "mpich" / "mpirun"
    hydra.parent.mkdir()
    hydra.write_text("#!/bin/sh\necho 'HYDRA build details:'\necho '    Version:  4.0.2'\n")
    hydra.chmod(0o755)
    monkeypatch.setenv("PATH", f"{hydra.parent}{os.pathsep}{os.environ['PATH']}")
    resp = client.post("/v1/internal/instances", headers=AUTH, json={
        "model": "tp-llama", "source": str(tp_converted), "tensor_parallel": 2})
    assert resp.status_code == 400, resp.get_json()
    message = resp.get_json()["error"]["message"]
    assert f"needs Open MPI's 'mpirun', but {hydra} is not Open MPI" in message, message
    assert "HYDRA build details:" in message and "openmpi-bin" in message, message
    assert client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"] == []


def test_the_agent_lists_its_instances_while_a_tensor_parallel_start_asks_another_mpis_mpirun_its_version(
        agent, client, tp_converted, tmp_path, monkeypatch):
    """A node's first tensor-parallel start asks `mpirun --version` (up to 30 s) whether it is Open MPI's. It asked
    while holding the lock the instance list is read under: the agent's heartbeats and GET /v1/internal/instances
    waited for mpirun's answer. Now the listing answers meanwhile; the start still ends with the answer (refused)."""
    started, release = tmp_path / "version-asked", tmp_path / "answer-now"
    slow = tmp_path / "slow-mpich" / "mpirun"
    slow.parent.mkdir()
    slow.write_text(f"#!/bin/sh\necho $$ > {started}.new && mv {started}.new {started}\n"  # its pid, then waits
                    f"while [ ! -e {release} ]; do sleep 0.1; done\necho 'HYDRA build details:'\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", f"{slow.parent}{os.pathsep}{os.environ['PATH']}")
    outcome = []

    def start() -> None:
        try:
            agent.workers.start(StartInstance(model="tp-llama", source=str(tp_converted), tensor_parallel=2))
        except InstanceError as exc:
            outcome.append(str(exc))

    starting = threading.Thread(target=start, name="tp-start")
    starting.start()
    try:
        wait_for(started.exists, timeout=60, what="the start to ask mpirun --version")
        asked = int(started.read_text())
        listed = client.get("/v1/internal/instances", headers=AUTH)
        # Answered while `mpirun --version` still waits to answer (before: once it timed out and was killed).
        assert Path(f"/proc/{asked}").exists() and outcome == []
        assert listed.status_code == 200 and listed.get_json()["instances"] == []
    finally:
        release.touch()
        starting.join()
    [refusal] = outcome
    assert f"needs Open MPI's 'mpirun', but {slow} is not Open MPI" in refusal, refusal


def test_starts_spanning_nodes_this_agent_cannot_run_are_refused(client, tp_converted, monkeypatch):
    """Ranks over 2 nodes start with srun inside the agent's own allocation of (at least) 2 nodes; the agent's
    drain signal must not be the one that stops them."""
    body = {"model": "tp-llama", "source": str(tp_converted), "tensor_parallel": 2, "nodes": 2}
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)

    def refusal() -> str:
        resp = client.post("/v1/internal/instances", json=body, headers=AUTH)
        assert resp.status_code == 400, resp.get_json()
        return resp.get_json()["error"]["message"]

    assert "this agent runs outside Slurm" in refusal()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert "needs an allocation of 2 nodes; this agent's job 42 has 1" in refusal()
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "needs 'srun' on this node's PATH" in refusal()
    assert client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"] == []
