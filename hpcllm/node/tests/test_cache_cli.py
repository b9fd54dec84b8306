"""`hpcllm cache` errors a user meets: an agent that is down, an unknown model, a bad node list, MPI + DRAM."""

from __future__ import annotations

import os
import time

import pytest

from hpcllm.cli.main import main
from hpcllm.httpkit.tests.thread_server import CannedServer
from hpcllm.tests.ports import free_port


def test_unreachable_agent_names_the_node_and_url(capsys):
    url = f"http://127.0.0.1:{free_port()}"

    code = main(["cache", "ls", "--agent-url", url])

    captured = capsys.readouterr()
    assert code == 4  # ls lists what it can, and a node it could not ask fails it (never a false "no copies")
    assert captured.err.startswith("error: ") and f"agent at {url} is not reachable" in captured.err
    assert "no cached copies" not in captured.out

    code = main(["cache", "evict", "llama", "--agent-url", url])
    assert code != 0 and f"agent at {url} is not reachable" in capsys.readouterr().err


def test_unknown_model_without_controller_or_source_is_a_clear_error(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["cache", "warm", "llama", "--nodes", "n1", "--url", url])

    err = capsys.readouterr().err
    assert code != 0 and "no --source given" in err and "Traceback" not in err


def test_bad_node_list_and_mpi_dram_are_refused(capsys, tmp_path):
    assert main(["cache", "warm", "llama", "--nodes", "n[4-1]", "--source", str(tmp_path)]) != 0
    assert "goes backwards" in capsys.readouterr().err
    assert main(["cache", "warm", "llama", "--nodes", "n1", "--mpi", "--tier", "dram",
                 "--source", str(tmp_path)]) != 0
    assert "--mpi warms the NVMe tier" in capsys.readouterr().err


def test_warm_refuses_a_timeout_that_is_not_positive(capsys, tmp_path):
    assert main(["cache", "warm", "llama", "--nodes", "n1", "--source", str(tmp_path), "--timeout", "-5"]) == 2
    assert "Invalid value for '--timeout'" in capsys.readouterr().err


def test_mpi_warm_of_a_missing_origin_fails_before_submitting(capsys, tmp_path):
    code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--mpi", "--source", str(tmp_path / "nowhere")])
    assert code != 0 and "does not exist" in capsys.readouterr().err


def test_mpi_warm_refuses_a_job_scoped_nvme_folder(capsys, tmp_path):
    code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--mpi", "--source", str(tmp_path),
                 "--nvme-dir-template", "/scratch/%j/nvme"])
    err = capsys.readouterr().err
    assert code != 0 and "job-scoped" in err and "without --mpi" in err and "Traceback" not in err


def test_nodes_the_controller_lost_are_skipped_by_ls_and_named_when_asked_for(capsys, monkeypatch):
    """The controller keeps nodes whose agent stopped (lost) or whose job ended (gone): `cache ls` lists the live
    ones without warnings about history, and naming a dead node says so instead of trying its old URL."""
    from hpcllm.node import cache_cli

    dead_url = f"http://127.0.0.1:{free_port()}"
    status = {"now": 1000.0, "models": [], "nodes": [
        {"node_id": "n1", "state": "gone", "agent_url": dead_url, "last_heartbeat": 400.0},
        {"node_id": "n2", "state": "lost", "agent_url": dead_url, "last_heartbeat": 955.0},
    ]}
    monkeypatch.setattr(cache_cli.Cluster, "status", lambda self: status)

    assert main(["cache", "ls"]) == 0
    captured = capsys.readouterr()
    assert "no cached copies" in captured.out and "not reachable" not in captured.err

    code = main(["cache", "verify", "--node", "n2"])
    err = capsys.readouterr().err
    assert code == 4 and "node n2's agent is down (the controller marks it lost, no heartbeat for 45 s)" in err
    assert err.count("error:") == 1 and "Traceback" not in err


@pytest.fixture
def canned_agent():
    server = CannedServer()
    yield server
    server.stop()


def test_an_agent_url_that_leads_elsewhere_is_not_taken_for_an_agent(capsys, canned_agent):
    """A URL answering JSON that is not the agent's (a proxy, another service): the command says so, per node,
    instead of a KeyError traceback or a false listing."""
    for command, field in ((["cache", "ls"], "cached"), (["cache", "evict", "llama"], "cached"),
                           (["cache", "verify"], "results")):
        assert main([*command, "--agent-url", canned_agent.url]) != 0
        err = capsys.readouterr().err
        assert f"{canned_agent.url} did not answer like an hpcllm node agent ({field}: Field required)" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("model, said", [("llama", "nothing to verify: llama is not cached"),
                                         (None, "nothing to verify: no cached copies")])
def test_verify_with_nothing_cached_says_so(capsys, canned_agent, model, said):
    """An empty output read as "every copy verified" for a model that was never cached (a typo)."""
    canned_agent.answer = ("application/json", b'{"results": []}')
    assert main(["cache", "verify", *(["--model", model] if model else []), "--agent-url", canned_agent.url]) == 0
    assert said in capsys.readouterr().out


def test_verify_says_a_copy_it_could_not_check_is_not_corrupt(capsys, canned_agent):
    canned_agent.answer = ("application/json", b'{"results": [{"model": "m+tp2.r1", "tier": "nvme", "ok": false, '
                                               b'"action": "unchecked", "message": "its origin cannot be read"}]}')
    assert main(["cache", "verify", "--agent-url", canned_agent.url]) == 4
    captured = capsys.readouterr()
    assert "m+tp2.r1 nvme: unchecked (its origin cannot be read)" in captured.out
    assert "1 copy could not be checked" in captured.err and "corrupt" not in captured.err


def test_verify_of_a_name_that_is_no_model_name_is_refused(capsys):
    assert main(["cache", "verify", "--model", "../x", "--agent-url", "http://127.0.0.1:9"]) != 0
    assert "model name" in capsys.readouterr().err


@pytest.fixture
def agent_of_n1():
    """An agent that says it is on n1 and records the warms it is asked for."""
    from flask import Flask, jsonify, request

    from hpcllm.httpkit.tests.thread_server import ThreadServer

    app = Flask("agent-n1")
    warms = []

    @app.get("/health")
    def health():
        return jsonify(node_id="n1")

    @app.post("/v1/internal/cache/warm")
    def warm():
        warms.append(request.get_json())
        return jsonify(model="llama", tier="nvme", path="/nvme/llama", bytes=1, last_used=1.0, verified=True,
                       in_use=0)

    server = ThreadServer(app)
    server.warms = warms
    yield server
    server.stop()


def test_an_agent_url_that_does_not_answer_is_said_to_be_silent_not_on_another_node(capsys, agent_of_n1, tmp_path):
    """`--nodes n[1-2]` with n2's agent down: the error says its agent did not answer (it said none of the agents
    was on n2, naming the silent one's URL as if it were a node)."""
    code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--source", str(tmp_path),
                 "--agent-url", agent_of_n1.url, "--agent-url", "http://127.0.0.1:9"])

    err = capsys.readouterr().err
    assert code == 4 and "the agent at http://127.0.0.1:9: it did not answer" in err and "n2" in err
    assert "none of the agents" not in err and "Traceback" not in err and agent_of_n1.warms == []


@pytest.mark.parametrize("extra", [[], ["--tensor-parallel", "2"]])
def test_a_node_asked_for_without_an_agent_url_is_named_not_skipped(capsys, agent_of_n1, tmp_path, extra):
    """`--nodes n[1-2]` with only n1's agent given: refused naming n2 (as when the controller knows no agent for it),
    before any warm; it reported success having warmed n1 only (and, with --tensor-parallel, all ranks on n1)."""
    code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--source", str(tmp_path), *extra,
                 "--agent-url", agent_of_n1.url])

    err = capsys.readouterr().err
    assert code == 4 and "n2" in err and "--agent-url" in err and "Traceback" not in err
    assert agent_of_n1.warms == []
    assert main(["cache", "warm", "llama", "--nodes", "n1", "--source", str(tmp_path),
                 "--agent-url", agent_of_n1.url]) == 0
    assert len(agent_of_n1.warms) == 1


def test_a_node_named_twice_in_the_hostlist_is_warmed_once(capsys, agent_of_n1, tmp_path, monkeypatch):
    """`--nodes n[1-2],n1` expands, as Slurm expands it (scontrol show hostnames), to n1 twice: the node's cache is
    warmed once, not twice at once."""
    from hpcllm.node import cache_cli
    from hpcllm.slurm.tests.fake_slurm import FakeSlurm

    fake = FakeSlurm(tmp_path / "bin")
    fake.on("scontrol", "show hostnames", stdout="n1\nn2\nn1\n")
    monkeypatch.setenv("PATH", fake.path_env())
    status = {"now": 1000.0, "models": [], "nodes": [
        {"node_id": n, "state": "up", "agent_url": agent_of_n1.url, "last_heartbeat": 999.0} for n in ("n1", "n2")]}
    monkeypatch.setattr(cache_cli.Cluster, "status", lambda self: status)

    code = main(["cache", "warm", "llama", "--nodes", "n[1-2],n1", "--source", str(tmp_path)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [c["args"] for c in fake.calls("scontrol")] == [["show", "hostnames", "n[1-2],n1"]]
    assert len(agent_of_n1.warms) == 2  # n1 and n2 (one test agent stands for both), not n1, n2 and n1 again


@pytest.mark.parametrize("url", ["http://[::1", "notaurl", "http://", "http://host:99999"])
def test_an_agent_url_that_is_no_url_is_refused_by_name(capsys, url):
    """A mistyped --agent-url is named as such (it was a traceback, or read as an agent that is down)."""
    code = main(["cache", "ls", "--agent-url", url])

    err = capsys.readouterr().err
    assert code != 0 and f"--agent-url {url!r} is not a URL like http://HOST:PORT" in err and "Traceback" not in err


def test_verify_reports_a_corrupt_copy_an_instance_still_uses(capsys, tmp_path, tiny_llama_dir):
    """`cache verify` through a real agent when a corrupt copy is in use: the copy is kept for its instance and the
    command says so and exits 1 (the agent's answer was refused by its own wire type: a 500, no result at all)."""
    from hpcllm.checkpoint import convert, read_checkpoint
    from hpcllm.httpkit.tests.thread_server import ThreadServer
    from hpcllm.node.app import create_app
    from hpcllm.node.tests.test_agent import SECRET, make_agent

    origin = tmp_path / "tiny-llama"
    convert(tiny_llama_dir, origin, progress=False)
    agent = make_agent(tmp_path)
    copy = agent.cache.warm("tiny-llama", origin, "nvme")
    agent.cache.acquire("tiny-llama", "nvme")  # a running instance's reference
    data = copy.path / read_checkpoint(origin).partitions[0].file
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(raw)
    config = tmp_path / "hpcllm.toml"
    config.write_text(f'[cluster]\nshared_secret = "{SECRET}"\n')
    server = ThreadServer(create_app(agent))
    try:
        code = main(["cache", "verify", "--config", str(config), "--agent-url", server.url])
    finally:
        server.stop()
        agent.workers.close()

    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "tiny-llama nvme: kept-in-use (corrupt but in use by 1 instance(s)" in captured.out
    assert "1 corrupt copy found" in captured.err


def test_the_mpi_warm_job_is_followed_through_slurm_being_unreachable_for_a_while(tmp_path):
    # One squeue timeout (slurmctld restarting) used to end the wait with SlurmUnavailable, and mpi_warm then
    # cancelled the job that was copying the checkpoint.
    from hpcllm.node.cache_cli import _follow
    from hpcllm.slurm import StatusWatcher
    from hpcllm.slurm.base import JobState
    from hpcllm.slurm.errors import SlurmUnavailable
    from hpcllm.slurm.tests.test_watcher import SPEC, MemoryBackend

    class RestartingSlurm(MemoryBackend):
        def __init__(self):
            super().__init__()
            self.answers = iter(["down", JobState.RUNNING, "down", JobState.COMPLETED])

        def statuses(self, job_ids):
            answer = next(self.answers, JobState.COMPLETED)
            if answer == "down":
                raise SlurmUnavailable("squeue --json did not answer within 60 s; is slurmctld up?")
            self.states.update({job_id: answer for job_id in job_ids})
            return super().statuses(job_ids)

    backend = RestartingSlurm()
    job = StatusWatcher(backend, min_interval=0.01, max_interval=0.02).submit(SPEC)
    status = _follow(job, tmp_path / "warm.err", 100, time.monotonic() + 60, False, "llama -> 2 nodes")
    assert status.state is JobState.COMPLETED  # followed to its end, not given up (and cancelled) at a timeout


@pytest.mark.parametrize("being_written", [b"mpiwarm: progress ", b"mpiwarm: progress 15",
                                           "error: caf\u00e9".encode()[:-1]])
def test_a_progress_line_read_while_it_is_written_does_not_end_the_mpi_warm(tmp_path, being_written):
    """The job's log is read while rank 0 writes to it: a last line cut short (in a number, or in a character of a
    message) ended the wait with an IndexError or UnicodeDecodeError traceback, and the warm with it (its job
    cancelled), or moved the bar back to a number cut short."""
    from hpcllm.node.cache_cli import _follow, _last_progress
    from hpcllm.slurm import StatusWatcher
    from hpcllm.slurm.base import JobState
    from hpcllm.slurm.tests.test_watcher import SPEC, MemoryBackend

    class RunningThenDone(MemoryBackend):
        def __init__(self):
            super().__init__()
            self.answers = iter([JobState.RUNNING, JobState.RUNNING, JobState.COMPLETED])

        def statuses(self, job_ids):
            self.states.update({job_id: next(self.answers, JobState.COMPLETED) for job_id in job_ids})
            return super().statuses(job_ids)

    err = tmp_path / "warm.err"
    err.write_bytes(b"mpiwarm: progress 100 200\n" + being_written)
    job = StatusWatcher(RunningThenDone(), min_interval=0.01, max_interval=0.02).submit(SPEC)

    status = _follow(job, err, 200, time.monotonic() + 60, False, "llama -> 2 nodes")
    assert status.state is JobState.COMPLETED and _last_progress(err) == 100


def test_the_mpi_warm_job_gets_what_it_runs_with_and_no_secrets(tmp_path, monkeypatch):
    # Without an inherit list sbatch exported the submitter's whole environment into the job (--export=ALL).
    from hpcllm.config import Config, SlurmConfig
    from hpcllm.node.cache_cli import mpi_warm_spec
    from hpcllm.slurm.environment import clean_environment

    for name, value in {"HPCLLM_ADMIN_KEY": "sk-admin", "HF_TOKEN": "hf_x", "PYTHONPATH": "/src",
                        "OMPI_MCA_btl": "self,tcp", "SITE_LICENSE": "lic"}.items():
        monkeypatch.setenv(name, value)
    config = Config(slurm=SlurmConfig(export_variables=["SITE_*"]))
    spec = mpi_warm_spec(config, "llama", tmp_path, ["n1", "n2"], "/var/tmp/hpcllm/nvme/%n", tmp_path)
    env = clean_environment(dict(spec.env), spec.inherit)  # what sbatch, and so the job, gets
    assert "HPCLLM_ADMIN_KEY" not in env and "HF_TOKEN" not in env
    assert env["PYTHONPATH"] == "/src" and env["OMPI_MCA_btl"] == "self,tcp" and env["SITE_LICENSE"] == "lic"
    assert env["PATH"] == os.environ["PATH"]


@pytest.fixture
def agents_n1_n2(tmp_path, tiny_llama_dir):
    """Two real node agents, on n1 and n2, over HTTP; `.origin`: a converted checkpoint, `.common`: the CLI options
    that reach both."""
    from types import SimpleNamespace

    from hpcllm.checkpoint import convert
    from hpcllm.node.tests.test_agent import agents_over_http

    origin = tmp_path / "tiny-llama"
    convert(tiny_llama_dir, origin, progress=False)
    with agents_over_http(tmp_path) as (agents, urls, config):
        yield SimpleNamespace(agents=agents, origin=origin,
                              common=["--config", str(config), "--agent-url", urls[0], "--agent-url", urls[1]])


def test_verify_of_a_model_cached_on_some_nodes_checks_those_and_passes(capsys, agents_n1_n2):
    """`cache verify --model M` over nodes of which only some hold M: their copies are checked and it passes (a node
    without M failed the command with exit 4, "not cached on this node", as if a copy could not be checked)."""
    n1, _ = agents_n1_n2.agents
    n1.cache.warm("tiny-llama", agents_n1_n2.origin, "nvme")

    code = main(["cache", "verify", "--model", "tiny-llama", *agents_n1_n2.common])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "n1: tiny-llama nvme: ok" in captured.out and "error" not in captured.err
    assert main(["cache", "verify", "--model", "other", *agents_n1_n2.common]) == 0
    assert "nothing to verify: other is not cached" in capsys.readouterr().out


def test_ls_lists_the_nodes_that_answered_when_another_fails(capsys, agents_n1_n2):
    """An agent answering `cache ls` with an error (its cache unusable) still fails the command, but the copies of
    the other nodes are listed (nothing was listed at all)."""
    n1, n2 = agents_n1_n2.agents
    n1.cache.warm("tiny-llama", agents_n1_n2.origin, "nvme")
    n2.cache = None  # an agent without a usable cache answers 503

    code = main(["cache", "ls", *agents_n1_n2.common])

    captured = capsys.readouterr()
    assert code == 4 and "node n2: " in captured.err and "no cache manager" in captured.err
    assert "n1" in captured.out and "tiny-llama" in captured.out and "Traceback" not in captured.err


def canned_warm_agent(node: str, release=None):
    """An agent on `node` answering warms with a verified copy; with `release` (a threading.Event), only once the test
    sets it, as a large checkpoint's warm goes on. The warms asked for are in `.warms`."""
    from flask import Flask, jsonify, request

    from hpcllm.httpkit.tests.thread_server import ThreadServer

    app = Flask(f"warm-agent-{node}")
    warms = []

    @app.get("/health")
    def health():
        return jsonify(node_id=node)

    @app.post("/v1/internal/cache/warm")
    def warm():
        warms.append(request.get_json())
        if release is not None:
            release.wait()
        return jsonify(model="llama", tier="nvme", path="/nvme/llama", bytes=1, last_used=1.0, verified=True,
                       in_use=0)

    server = ThreadServer(app)
    server.release, server.warms = release, warms
    return server


@pytest.fixture
def slow_agent_n1():
    """An agent on n1 whose warms go on until the test releases them (`.release`), as a large checkpoint's do."""
    import threading

    server = canned_warm_agent("n1", threading.Event())
    yield server
    server.release.set()
    server.stop()


@pytest.mark.parametrize("extra", [[], ["--tensor-parallel", "2"]])
def test_a_warm_through_the_agents_ends_at_its_timeout(capsys, slow_agent_n1, tmp_path, extra):
    """`cache warm --timeout N` without --mpi: the command gives up after N seconds, saying so (the option was
    ignored: every node's warm was waited for an hour, then reported as an agent that is not reachable)."""
    import threading

    codes = []
    command = threading.Thread(target=lambda: codes.append(main(
        ["cache", "warm", "llama", "--nodes", "n1", "--source", str(tmp_path), "--timeout", "0.5", *extra,
         "--agent-url", slow_agent_n1.url])), daemon=True)
    command.start()
    command.join(120)  # far beyond the 0.5 s asked for; without the timeout it would wait for the release

    slow_agent_n1.release.set()
    command.join()
    err = capsys.readouterr().err
    assert codes == [4], err
    assert "n1" in err and "did not finish within --timeout 0.5 s" in err and "not reachable" not in err


def test_a_relative_source_reaches_the_agents_as_the_folder_the_user_named(agent_of_n1, tmp_path, monkeypatch):
    """`cache warm M --source models/m` from the user's folder: the agent gets the absolute path (it got
    "models/m", which it read from its own current folder: not found there, or another checkpoint cached as M)."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    assert main(["cache", "warm", "llama", "--nodes", "n1", "--source", "models/m",
                 "--agent-url", agent_of_n1.url]) == 0
    assert [w["source"] for w in agent_of_n1.warms] == [str(tmp_path / "models" / "m")]


@pytest.mark.parametrize("extra", [[], ["--tensor-parallel", "2"]])
def test_a_node_after_one_that_timed_out_is_still_warmed(capsys, slow_agent_n1, tmp_path, extra):
    """Nodes are warmed one after another and --timeout bounds each node's warm: n1's still running at its end fails
    n1, and n2 is warmed all the same (the nodes shared one --timeout: n2 was never asked, "ran out before its turn",
    and 8 nodes of 10 minutes each failed the last ones under the default hour)."""
    fast_n2 = canned_warm_agent("n2")
    try:
        code = main(["cache", "warm", "llama", "--nodes", "n[1-2]", "--source", str(tmp_path), "--timeout", "0.5",
                     *extra, "--agent-url", slow_agent_n1.url, "--agent-url", fast_n2.url])
    finally:
        slow_agent_n1.release.set()
        fast_n2.stop()

    captured = capsys.readouterr()
    assert code == 4, captured.err
    assert "node n1: the warm did not finish within --timeout 0.5 s" in captured.err
    assert "n2" not in captured.err and len(fast_n2.warms) == 1, captured.err


def test_a_warm_to_an_agent_that_cannot_be_connected_to_ends_at_its_timeout(capsys, monkeypatch, tmp_path):
    """--timeout shorter than the connect allowance (CONNECT_SECONDS, made an hour here so that it cannot be missed):
    a node whose agent's host drops the connection attempt (a listening socket whose backlog is full) fails at the
    --timeout, as not reachable; the connect allowance ran past it (10 s for a --timeout of 1 s)."""
    import socket
    import threading

    from hpcllm.node import cache_cli

    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    waiting = [socket.socket() for _ in range(3)]  # fill the backlog: further SYNs are dropped, connect hangs
    for sock in waiting:
        sock.setblocking(False)
        sock.connect_ex(listener.getsockname())
    status = {"now": 1000.0, "models": [], "nodes": [{"node_id": "n1", "state": "up", "agent_url": url}]}
    monkeypatch.setattr(cache_cli.Cluster, "status", lambda self: status)
    monkeypatch.setattr(cache_cli, "CONNECT_SECONDS", 3600.0)

    codes = []
    command = threading.Thread(target=lambda: codes.append(main(
        ["cache", "warm", "llama", "--nodes", "n1", "--source", str(tmp_path), "--timeout", "0.5"])), daemon=True)
    try:
        command.start()
        command.join(120)  # far beyond the 0.5 s asked for; without the bound it would wait for the connect hour
        ended_in_time = not command.is_alive()
    finally:
        for sock in (*waiting, listener):
            sock.close()
    command.join(180)  # (a command still connecting ends once the kernel gives up on it)
    err = capsys.readouterr().err
    assert ended_in_time and codes == [4], err
    assert f"node n1's agent at {url} is not reachable (ConnectTimeout" in err


def test_a_warm_asked_again_while_the_node_still_copies_is_answered_at_once(capsys, agents_n1_n2):
    """`cache warm` run again (its --timeout ran out) while n1's agent still copies the model: the agent waited for
    that copy before answering, holding one of its threads (node.threads) for it, so that enough re-runs left none
    for the controller's calls. It now answers at once that the copy is under way."""
    from hpcllm.node.tests.test_cache import warm_held_in_a_thread

    n1, _ = agents_n1_n2.agents
    with warm_held_in_a_thread(n1.cache, "tiny-llama", agents_n1_n2.origin, after=0) as errors:
        code = main(["cache", "warm", "tiny-llama", "--nodes", "n1", "--source", str(agents_n1_n2.origin),
                     *agents_n1_n2.common])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "node n1: model 'tiny-llama' is being copied into the nvme tier already" in err and "retry" in err
    assert errors == [] and [(c.model, c.tier) for c in n1.cache.list()] == [("tiny-llama", "nvme")]


@pytest.fixture
def slurm_ending_at_once(monkeypatch):
    """Slurm as a scheduler whose jobs end at once, their logs written on a node's own disk (not visible here); the
    specs submitted to it."""
    from hpcllm.slurm.base import JobState
    from hpcllm.slurm.tests.test_watcher import MemoryBackend

    specs = []

    class EndsAtOnce(MemoryBackend):
        def submit(self, spec):
            job_id = super().submit(spec)
            specs.append(spec)
            self.states[job_id] = JobState.COMPLETED
            return job_id

    monkeypatch.setattr("hpcllm.slurm.get_backend", lambda slurm_config: EndsAtOnce())
    return specs


@pytest.fixture
def converted_tiny_llama(tmp_path, tiny_llama_dir):
    from hpcllm.checkpoint import convert

    origin = tmp_path / "tiny-llama"
    convert(tiny_llama_dir, origin, progress=False)
    return origin


def test_the_mpi_warm_job_logs_where_the_admin_runs_it_and_says_so(tmp_path, converted_tiny_llama, monkeypatch,
                                                                    capsys, slurm_ending_at_once):
    """The job's log went to <paths.state_dir>/cache-warm, a node-local folder by default (/var/tmp/hpcllm): written
    on the job's first node, where the admin at the login node cannot find it (and the command then could not read
    the copies from it either). It goes where sbatch puts a job's log, the folder the command is run from (or
    --log-dir), and the command says where before waiting."""
    config = tmp_path / "hpcllm.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "node-local"}"\n')
    submit_dir = tmp_path / "home"
    submit_dir.mkdir()
    monkeypatch.chdir(submit_dir)

    code = main(["cache", "warm", "tiny-llama", "--nodes", "n[1-2]", "--mpi", "--source", str(converted_tiny_llama),
                 "--config", str(config), "--timeout", "60"])

    captured = capsys.readouterr()
    [spec] = slurm_ending_at_once
    assert os.path.dirname(spec.output) == os.path.dirname(spec.error) == str(submit_dir)
    assert f"log: {spec.output}" in captured.out
    assert code != 0 and f"{spec.output} is not visible from this host" in captured.err
    assert "--log-dir" in captured.err and "Traceback" not in captured.err


def test_an_mpi_warm_without_progress_prints_nothing(tmp_path, converted_tiny_llama, capsys, slurm_ending_at_once):
    """bench/warm.py asks for no progress: the job's log path was printed into its output all the same."""
    from hpcllm.config import parse_config
    from hpcllm.node.cache_cli import mpi_warm
    from hpcllm.node.cache import CacheError

    with pytest.raises(CacheError, match="is not visible from this host"):  # the job's log is on a node's own disk
        mpi_warm(parse_config({}), "tiny-llama", converted_tiny_llama, ["n1"], str(tmp_path / "nvme"), 60,
                 log_dir=tmp_path / "logs", show_progress=False)
    assert slurm_ending_at_once and capsys.readouterr().out == ""


def test_an_mpi_warm_log_folder_it_cannot_write_is_refused_before_submitting(tmp_path, converted_tiny_llama, capsys,
                                                                              slurm_ending_at_once):
    """A --log-dir the admin cannot write (or cannot make) was submitted all the same: Slurm could not open the
    job's log, and the command said only that it saw none ('not visible from this host')."""
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if os.getuid() == 0:  # root writes any folder but procfs's
        read_only = "/proc/self"
    (tmp_path / "a-file").write_text("")
    for log_dir in (str(read_only), str(tmp_path / "a-file" / "logs")):
        code = main(["cache", "warm", "tiny-llama", "--nodes", "n1", "--mpi", "--source", str(converted_tiny_llama),
                     "--log-dir", log_dir, "--timeout", "60"])
        err = capsys.readouterr().err
        assert code != 0 and log_dir in err and "give --log-dir a folder you can write" in err, err
        assert "Traceback" not in err
    assert slurm_ending_at_once == []  # nothing submitted
