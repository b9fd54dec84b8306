"""slurmrestd backend against a recorded-shape stand-in server (httpx.MockTransport); the real slurmrestd is in
test_integration.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from hpcllm.config import SlurmConfig
from hpcllm.slurm.base import JobState, make_job_spec
from hpcllm.slurm.factory import get_backend
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable
from hpcllm.slurm.rest_backend import RestBackend, submission_body

FIXTURES = Path(__file__).parent / "fixtures"


class Server:
    """Answers like slurmrestd v0.0.38 and records the requests."""

    def __init__(self):
        self.requests: list[httpx.Request] = []
        self.partition_ok = True
        # What GET .../reservations lists, and the nodes Slurm marks RESERVED (in an active reservation).
        self.reservations = [{"name": "hpcllm", "node_list": "n[2-3]", "node_count": 2, "flags": ["SPEC_NODES"]}]
        self.reserved: set[str] = set()
        self.reservations_refused = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.headers.get("X-SLURM-USER-TOKEN") != "tok":
            return httpx.Response(401, text="Authentication failure")
        if path == "/slurm/v0.0.38/job/submit":
            body = json.loads(request.content)
            if body["job"].get("partition") == "nope":
                return httpx.Response(500, json={"errors": [{"error_code": 2000,
                                                             "error": "Invalid partition name specified"}]})
            return httpx.Response(200, json={"errors": [], "job_id": 31, "step_id": "BATCH"})
        if path == "/slurm/v0.0.38/jobs":
            return httpx.Response(200, text=(FIXTURES / "squeue_22.05.json").read_text())
        if path == "/slurm/v0.0.38/nodes":
            payload = json.loads((FIXTURES / "sinfo_22.05.json").read_text())
            for node in payload["nodes"]:
                if node["name"] in self.reserved:
                    node["state_flags"] = [*node.get("state_flags", []), "RESERVED"]
            return httpx.Response(200, json=payload)
        if path == "/slurm/v0.0.38/partitions":
            return httpx.Response(200, text=(FIXTURES / "rest_partitions_v0.0.38.json").read_text())
        if path == "/slurm/v0.0.38/reservations":
            if self.reservations_refused:
                return httpx.Response(500, json={"errors": [{"error_code": 1, "error": "Unable to query "
                                                             "reservations"}], "reservations": []})
            return httpx.Response(200, json={"errors": [], "reservations": self.reservations})
        if path.startswith("/slurm/v0.0.38/job/") and request.method == "DELETE":
            return httpx.Response(200, json={"errors": []})
        return httpx.Response(404, text="not found")


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def backend(server, monkeypatch) -> RestBackend:
    monkeypatch.setenv("SLURM_JWT", "tok")
    config = SlurmConfig(backend="rest", rest_url="http://slurmrestd.test:6820", rest_user="svc")
    return RestBackend(config, transport=httpx.MockTransport(server))


def test_factory_builds_the_rest_backend(monkeypatch):
    monkeypatch.setenv("SLURM_JWT", "tok")
    backend = get_backend(SlurmConfig(backend="rest"))
    assert isinstance(backend, RestBackend)
    backend.close()


def test_submit_sends_script_and_properties_with_jwt_headers(backend, server, tmp_path):
    spec = make_job_spec(name="pool", script="echo hi", partition="batch", time="01:30:00", nodes=2,
                         gpus_per_node=1, signal="USR1@60", requeue=True, output=f"{tmp_path}/logs/%j.out", mem="2G",
                         ntasks_per_node=1, env={"HPCLLM_CONFIG": "/etc/h.toml"}, chdir="/srv")
    assert backend.submit(spec) == "31"
    request = server.requests[-1]
    assert request.headers["X-SLURM-USER-NAME"] == "svc" and request.headers["X-SLURM-USER-TOKEN"] == "tok"
    body = json.loads(request.content)
    job = body["job"]
    assert body["script"].startswith("#!/bin/bash\n#SBATCH --job-name=pool")
    assert job["signal"] == "USR1@60"  # no "B:" in v0.0.38
    assert (job["gres"], job["time_limit"], job["nodes"], job["tasks"]) == ("gpu:1", 90, [2, 2], 2)
    assert (job["requeue"], job["open_mode"], job["memory_per_node"]) == (True, "append", 2048)
    assert job["environment"]["HPCLLM_CONFIG"] == "/etc/h.toml" and job["current_working_directory"] == "/srv"
    assert (tmp_path / "logs").is_dir()  # Slurm creates no log folders; a missing one fails the job silently
    assert not any(k.startswith("SLURM_") and k != "SLURM_CONF" for k in job["environment"])


def test_a_job_that_inherits_a_list_of_variables_gets_only_those(backend, server, monkeypatch):
    monkeypatch.setenv("HPCLLM_SHARED_SECRET", "s3cret")
    monkeypatch.setenv("LC_CTYPE", "C.UTF-8")
    backend.submit(make_job_spec(name="agent", script="true", inherit=("PATH", "LC_*"), env={"HPCLLM_X": "1"}))
    environment = json.loads(server.requests[-1].content)["job"]["environment"]
    assert {"PATH", "LC_CTYPE", "HPCLLM_X"} <= set(environment) and "HPCLLM_SHARED_SECRET" not in environment
    backend.submit(make_job_spec(name="any", script="true"))
    assert json.loads(server.requests[-1].content)["job"]["environment"]["HPCLLM_SHARED_SECRET"] == "s3cret"


def test_refusal_carries_slurms_message(backend):
    with pytest.raises(SlurmError, match="Invalid partition name specified") as refused:
        backend.submit(make_job_spec(name="x", script="true", partition="nope"))
    assert not isinstance(refused.value, SlurmUnavailable)
    assert "asked for partition 'nope': set [slurm] partition" in str(refused.value)


def test_statuses_nodes_partitions_use_the_shared_adapter(backend, server):
    statuses = backend.statuses(["1", "3", "77"])
    assert statuses["1"].state is JobState.COMPLETED and statuses["3"].state is JobState.RUNNING
    assert statuses["77"].missing
    assert [r.url.path for r in server.requests] == ["/slurm/v0.0.38/jobs"]  # one call for all jobs
    assert [n.gpus_total for n in backend.nodes()] == [2, 2, 2, 2]
    assert [p.name for p in backend.partitions() if p.is_default] == ["batch"]


def test_where_the_service_runs_in_a_reservation_only_that_reservations_nodes_are_available(backend, server,
                                                                                             monkeypatch):
    monkeypatch.setenv("SBATCH_RESERVATION", "hpcllm")
    assert {n.name: n.available for n in backend.nodes()} == {"n1": False, "n2": True, "n3": True, "n4": False}
    assert server.requests[-1].url.path == "/slurm/v0.0.38/reservations"
    monkeypatch.setenv("SBATCH_RESERVATION", "ended")
    with pytest.raises(SlurmError, match="Slurm shows no reservation 'ended', which SBATCH_RESERVATION .* names .*"
                                         "or unset it"):
        backend.nodes()
    server.reservations_refused = True  # slurmrestd cannot say: no advice to unset a reservation that may exist
    with pytest.raises(SlurmError, match="cannot read Slurm's reservations, for the nodes of 'ended', .*Unable to "
                                         "query reservations") as refused:
        backend.nodes()
    assert "unset" not in str(refused.value)


def test_a_flex_or_node_less_reservations_jobs_may_run_on_the_nodes_in_no_reservation(backend, server,
                                                                                      monkeypatch):
    """FLEX: its node n2 and the nodes in no reservation (n1, n4), not the class's n3; a licence reservation
    (ANY_NODES, no nodes): n1 and n4. One GET .../reservations per listing reads both."""
    server.reservations = [{"name": "flex", "node_list": "n2", "flags": ["FLEX", "SPEC_NODES"]},
                           {"name": "class", "node_list": "n3", "flags": ["SPEC_NODES"]},
                           {"name": "licences", "node_list": "", "node_count": 0, "flags": ["ANY_NODES"]}]
    server.reserved = {"n2", "n3"}
    monkeypatch.setenv("SBATCH_RESERVATION", "flex,licences")
    assert {n.name: n.reservations for n in backend.nodes()} == {
        "n1": ("flex", "licences"), "n2": ("flex",), "n3": (), "n4": ("flex", "licences")}
    monkeypatch.setenv("SBATCH_RESERVATION", "licences")
    assert {n.name: n.available for n in backend.nodes()} == {"n1": True, "n2": False, "n3": False, "n4": True}
    assert [r.url.path for r in server.requests].count("/slurm/v0.0.38/reservations") == 2


def test_cancel_and_signal(backend, server):
    backend.cancel("5")
    backend.signal("5", "SIGUSR1")
    assert [(r.method, r.url.path, dict(r.url.params)) for r in server.requests] == [
        ("DELETE", "/slurm/v0.0.38/job/5", {}), ("DELETE", "/slurm/v0.0.38/job/5", {"signal": "USR1"})]
    with pytest.raises(SlurmError, match="cannot send SIGWINCH"):
        backend.signal("5", "WINCH")


def test_requeue_is_a_clear_error(backend):
    with pytest.raises(SlurmError, match="no requeue operation.*scontrol requeue"):
        backend.requeue("5")


def test_mem_0_asks_for_all_of_each_nodes_memory_as_sbatch_does():
    # sbatch --mem=0: the whole memory of each node; v0.0.38 hands memory_per_node to the same option parser.
    assert submission_body(make_job_spec(name="x", script="true", mem="0"))["job"]["memory_per_node"] == 0
    assert submission_body(make_job_spec(name="x", script="true", mem="1500K"))["job"]["memory_per_node"] == 2


def test_node_lists_use_the_keys_slurmrestd_22_05_accepts():
    # Not "required_nodes"/"excluded_nodes" (v0.0.38 answers "Disabled key") nor "exclude" ("Unknown key").
    job = submission_body(make_job_spec(name="x", script="true", nodelist=("n3",), exclude=("n1", "n2"),
                                        comment="hpcllm-alloc-1"))["job"]
    assert (job["nodelist"], job["exclude_nodes"], job["comment"]) == ("n3", "n1,n2", "hpcllm-alloc-1")
    plain = submission_body(make_job_spec(name="x", script="true"))["job"]
    assert "nodelist" not in plain and "exclude_nodes" not in plain


def test_bad_token_names_the_user(server, monkeypatch):
    monkeypatch.setenv("SLURM_JWT", "wrong")
    backend = RestBackend(SlurmConfig(backend="rest", rest_user="svc"), transport=httpx.MockTransport(server))
    with pytest.raises(SlurmError, match="refused the credentials of user 'svc'"):
        backend.statuses(["1"])


def test_token_file_wins_over_the_environment(server, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JWT", "wrong")
    token_file = tmp_path / "jwt"
    token_file.write_text("SLURM_JWT=tok\n")
    backend = RestBackend(SlurmConfig(backend="rest", rest_token_file=token_file),
                          transport=httpx.MockTransport(server))
    assert backend.statuses(["1"])["1"].state is JobState.COMPLETED


@pytest.mark.parametrize("content", [b"SLURM_JWT=eyJs3cret\nSLURM_JWT=eyJs3cret\n", b"\xff\xfeeyJs3cret"])
def test_a_token_file_holding_more_than_a_jwt_is_named_without_showing_it(server, tmp_path, content):
    """A line break inside went out as the header anyway (over a real connection: 'slurmrestd is not reachable
    (Illegal header value b'<the JWT>')', retried for ever); a file that is not UTF-8 was a UnicodeDecodeError."""
    token_file = tmp_path / "jwt"
    token_file.write_bytes(content)
    backend = RestBackend(SlurmConfig(backend="rest", rest_token_file=token_file),
                          transport=httpx.MockTransport(server))
    with pytest.raises(SlurmError, match=f"rest_token_file {token_file} holds more than a JWT") as refused:
        backend.statuses(["1"])
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("content", [b"", b"  \n", b"SLURM_JWT=\n"])
def test_an_empty_token_file_is_named_as_empty(server, tmp_path, content):
    token_file = tmp_path / "jwt"
    token_file.write_bytes(content)
    backend = RestBackend(SlurmConfig(backend="rest", rest_token_file=token_file),
                          transport=httpx.MockTransport(server))
    with pytest.raises(SlurmError, match=f"rest_token_file {token_file} is empty; it must hold what `scontrol token` "
                                         f"prints"):
        backend.statuses(["1"])


def test_a_slurm_jwt_of_spaces_is_named_as_empty(server, monkeypatch):
    monkeypatch.setenv("SLURM_JWT", "   ")
    backend = RestBackend(SlurmConfig(backend="rest"), transport=httpx.MockTransport(server))
    with pytest.raises(SlurmError, match="\\$SLURM_JWT is empty; it must hold what `scontrol token` prints"):
        backend.statuses(["1"])


def test_an_scontrol_token_printing_more_than_a_jwt_is_named_without_showing_it(tmp_path, monkeypatch):
    """A site's scontrol wrapper printing a second line after the token: it went out in the header (over a real
    connection 'slurmrestd is not reachable (Illegal header value ...)', retried for ever)."""
    from hpcllm.slurm.tests.fake_slurm import FakeSlurm

    monkeypatch.delenv("SLURM_JWT", raising=False)
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    fake.on("scontrol", "token", stdout="SLURM_JWT=eyJs3cret\nsite wrapper: token issued\n")
    backend = RestBackend(SlurmConfig(backend="rest"), transport=httpx.MockTransport(Server()))
    with pytest.raises(SlurmError, match="what `scontrol token` printed after SLURM_JWT= holds more than a JWT") \
            as refused:
        backend.statuses(["1"])
    assert "s3cret" not in str(refused.value)


def test_no_token_while_slurmctld_is_down_is_unavailable_not_a_jwt_misconfiguration(tmp_path, monkeypatch):
    from hpcllm.slurm.tests.fake_slurm import FakeSlurm

    monkeypatch.delenv("SLURM_JWT", raising=False)
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    fake.on("scontrol", "token", stderr="scontrol: error: Unable to contact slurm controller (connect failure)\n",
            rc=1)
    backend = RestBackend(SlurmConfig(backend="rest"), transport=httpx.MockTransport(Server()))
    with pytest.raises(SlurmUnavailable, match="scontrol token: Slurm is not reachable: .*Unable to contact"):
        backend.statuses(["1"])  # not "is AuthAltTypes=auth/jwt set?", a refusal


def test_an_scontrol_that_cannot_be_run_for_a_token_is_unavailable_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JWT", raising=False)
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho SLURM_JWT=x\n")  # not executable
    monkeypatch.setenv("PATH", str(tmp_path))
    backend = RestBackend(SlurmConfig(backend="rest"), transport=httpx.MockTransport(Server()))
    with pytest.raises(SlurmUnavailable, match="scontrol, which would make one, cannot be run .Permission denied.; "
                                               "set SLURM_JWT or \\[slurm\\] rest_token_file"):
        backend.statuses(["1"])


def test_unreachable_slurmrestd_is_unavailable(monkeypatch):
    monkeypatch.setenv("SLURM_JWT", "tok")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = RestBackend(SlurmConfig(backend="rest", rest_url=f"http://127.0.0.1:{port}"), timeout=5)
    with pytest.raises(SlurmUnavailable, match="not reachable"):
        backend.nodes()


def test_a_slurmrestd_without_v0_0_38_says_so(monkeypatch):
    # Slurm 24.05+ (v0.0.38 removed) or a slurmrestd started without -s openapi/v0.0.38 answers every path so.
    monkeypatch.setenv("SLURM_JWT", "tok")
    answer = "Unable find requested URL. Please view /openapi/v3 for API reference."
    backend = RestBackend(SlurmConfig(backend="rest"),
                          transport=httpx.MockTransport(lambda request: httpx.Response(404, text=answer)))
    for call in (lambda: backend.statuses(["1"]), lambda: backend.submit(make_job_spec(name="x", script="true"))):
        with pytest.raises(SlurmError, match=r"does not serve openapi v0.0.38 .* backend = \"cli\""):
            call()


@pytest.mark.parametrize("words", ["Socket timed out on send/recv operation",
                                   "Zero Bytes were transmitted or received"])
def test_slurmctld_not_answering_slurmrestd_is_unavailable_not_a_refusal(words, monkeypatch):
    # As from sbatch: a submit whose answer was lost may have made the job; a refusal would drop the intent.
    monkeypatch.setenv("SLURM_JWT", "tok")
    answer = {"errors": [{"error": words, "error_number": 5004, "description": "Batch job submission failed"}]}
    backend = RestBackend(SlurmConfig(backend="rest"),
                          transport=httpx.MockTransport(lambda request: httpx.Response(500, json=answer)))
    with pytest.raises(SlurmUnavailable, match=f"Slurm is not reachable: {words}.*check with: scontrol ping"):
        backend.submit(make_job_spec(name="x", script="true"))


def test_unsupported_api_version_is_refused():
    with pytest.raises(SlurmError, match="rest_api_version = 'v0.0.40' is not supported"):
        RestBackend(SlurmConfig(backend="rest", rest_api_version="v0.0.40"))


# ------------------------------------------------------------------------- answers that are not UTF-8 (Latin-1)

# The audit's answers (/tmp/audit-wk/s4.py): a job name and a submit warning written in Latin-1.
LATIN1_JOBS = b'{"jobs":[{"job_id":1,"job_state":"RUNNING","name":"caf\xe9"},{"job_id":2,"job_state":"RUNNING"}],"errors":[]}'
LATIN1_SUBMIT = b'{"job_id":5,"step_id":"batch","errors":[],"warnings":[{"description":"caf\xe9"}]}'


def answering(content: bytes, monkeypatch) -> RestBackend:
    monkeypatch.setenv("SLURM_JWT", "tok")
    return RestBackend(SlurmConfig(backend="rest"),
                       transport=httpx.MockTransport(lambda request: httpx.Response(200, content=content)))


def test_a_latin1_job_name_does_not_break_statuses(monkeypatch):
    statuses = answering(LATIN1_JOBS, monkeypatch).statuses(["1", "2"])
    assert statuses["1"].name == "caf\ufffd" and statuses["2"].state is JobState.RUNNING


def test_a_latin1_submit_warning_still_gives_the_job_id(monkeypatch):
    assert answering(LATIN1_SUBMIT, monkeypatch).submit(make_job_spec(name="x", script="true")) == "5"


@pytest.mark.parametrize("content", [b"<html>proxy error</html>", b'{"errors":[],"step_id":"batch"}'])
def test_an_unreadable_submit_answer_is_lost_not_refused(content, monkeypatch):
    # HTTP 200: the job may exist. SlurmUnavailable keeps the controller's intent (it adopts the job by its
    # comment); a SlurmError would drop it as refused and leave the job running untracked.
    with pytest.raises(SlurmUnavailable):
        answering(content, monkeypatch).submit(make_job_spec(name="x", script="true"))
