"""What Slurm 22.05 answers in cases the other backend tests leave out, recorded on the dev cluster, and what hpcllm
makes of it (stand-in commands, no cluster needed)."""

from __future__ import annotations

import os
import signal

import pytest

from hpcllm.config import SlurmConfig
from hpcllm.procs import pid_alive
from hpcllm.slurm import adapter
from hpcllm.slurm.base import JobState, JobStatus, make_job_spec
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable
from hpcllm.slurm.tests.fake_slurm import FakeSlurm


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    yield fake
    for pid in fake.lingering():
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def backend() -> CliBackend:
    return CliBackend(SlurmConfig(), command_timeout=10)


def test_a_job_refused_because_every_node_was_left_out_says_which_nodes_it_left_out(fake, backend):
    # 22.05, `sbatch --exclude=n[1-4]` on a partition of n[1-4] (the controller leaves out the nodes where its agents
    # run): the words Slurm also uses for more GPUs per node than the partition has.
    stderr = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    fake.on("sbatch", "", stderr=stderr, rc=1)
    spec = make_job_spec(name="t", script="true", partition="batch", gpus_per_node=1,
                         exclude=("n1", "n2", "n3", "n4"))
    with pytest.raises(SlurmError) as refused:
        backend.submit(spec)
    assert not isinstance(refused.value, SlurmUnavailable)
    message = str(refused.value)
    assert message.startswith(f"sbatch --parsable failed: {stderr.strip()}")
    assert "none of nodes n1,n2,n3,n4 (--exclude" in message

    named = make_job_spec(name="t", script="true", gpus_per_node=1, nodelist=("n3",))
    with pytest.raises(SlurmError, match=r"only nodes n3 \(--nodelist\)"):
        backend.submit(named)


def test_gpus_of_an_untyped_gres_whose_type_prints_as_null_are_counted():
    # Slurm prints the type of a GPU gres.conf gives none as "(null)" in a node's GresUsed (gres.c formats a NULL
    # type name), beside the in-use index list: "gpu:(null):0(IDX:N/A)" is a node with no GPU in use.
    line = ("NodeName=g1 Arch=x86_64 CPUAlloc=0 CPUTot=32 Gres=gpu:(null):2 GresDrain=N/A "
            "GresUsed=gpu:(null):{used} NodeAddr=g1 RealMemory=128000 AllocMem=0 State=IDLE Partitions=gpu\n")
    [idle] = adapter.nodes_from_scontrol_text(line.format(used="0(IDX:N/A)"))
    assert (idle.gpus_total, idle.gpus_used, idle.gpus_free) == (2, 0, 2)
    [busy] = adapter.nodes_from_scontrol_text(line.format(used="2(IDX:0-1)"))
    assert (busy.gpus_used, busy.gpus_free) == (2, 0)


# `squeue -h -a -t all --array -O <SQUEUE_TEXT_FORMAT>` on 22.05 with an array 20 (1-3%1, task 1 running) and a
# het job 21 queued: JobID is each job's own number, JobArrayID the id users give.
ARRAY_AND_HET_TEXT = """\
20|PENDING|JobArrayTaskLimit||N/A|N/A|5:00|0|batch|20_2|arr|
20|PENDING|JobArrayTaskLimit||N/A|N/A|5:00|0|batch|20_3|arr|
21|PENDING|None||N/A|N/A|5:00|0|batch|21+0|het|
22|PENDING|None||N/A|N/A|5:00|0|batch|21+1|het|
23|RUNNING|None|n1|1796682576|1796682876|5:00|0|batch|20_1|arr|
"""


def test_array_tasks_and_het_components_are_found_by_their_ids_where_squeue_has_no_json(fake, backend):
    # `hpcllm slurm jobs 20_1 21+1` on a Slurm without squeue --json: the text format's JobID prints 23 and 22.
    fake.on("squeue", "--json", stderr="squeue: unrecognized option '--json'\n", rc=1)
    fake.on("squeue", "--Format", stdout=ARRAY_AND_HET_TEXT)
    fake.on("sacct", "", stderr="Slurm accounting storage is disabled\n", rc=1)
    statuses = backend.statuses(["20_1", "20_3", "21+1", "23"])
    assert {job_id: (s.state, s.missing) for job_id, s in statuses.items()} == {
        "20_1": (JobState.RUNNING, False), "20_3": (JobState.PENDING, False), "21+1": (JobState.PENDING, False),
        "23": (JobState.RUNNING, False)}
    assert statuses["20_1"].job_id == "20_1" and statuses["20_1"].nodes == ("n1",)
    assert statuses["20_3"].reason == "JobArrayTaskLimit"


def test_a_wait_that_times_out_on_a_held_job_says_why_it_has_not_started():
    # `hpcllm cache warm --mpi` waits for its job: one Slurm held after a failed launch would never start, and the
    # timeout said only "PENDING".
    from hpcllm.slurm.tests.test_watcher import MemoryBackend
    from hpcllm.slurm.watcher import StatusWatcher

    class HeldBackend(MemoryBackend):
        def statuses(self, job_ids):
            return {j: JobStatus(job_id=j, state=JobState.PENDING, raw_state="PENDING",
                                 reason="launch failed requeued held") for j in job_ids}

    job = StatusWatcher(HeldBackend(), min_interval=0.01, max_interval=0.05).submit(
        make_job_spec(name="t", script="true"))
    with pytest.raises(TimeoutError, match=rf"{job.job_id}: PENDING \(launch failed requeued held\)"):
        job.wait(timeout=0.1)


def _jwt(claims: dict | str) -> str:
    """A token shaped like `scontrol token`'s (header.claims.signature, base64url without padding); claims: a dict,
    or its JSON text as written (values json.dumps would not write so)."""
    import base64
    import json

    def part(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    claims_text = claims if isinstance(claims, str) else json.dumps(claims)
    return f"{part(json.dumps({'alg': 'HS256', 'typ': 'JWT'}))}.{part(claims_text)}.c2lnbmF0dXJl"


def _token_recording_backend(monkeypatch, token: str):
    """A REST backend given SLURM_JWT=token, in front of a slurmrestd that answers every request with no jobs:
    (backend, the X-SLURM-USER-TOKEN each request carried)."""
    import httpx

    from hpcllm.slurm.rest_backend import RestBackend

    monkeypatch.setenv("SLURM_JWT", token)
    seen = []

    def slurmrestd(request):
        seen.append(request.headers["X-SLURM-USER-TOKEN"])
        return httpx.Response(200, json={"errors": [], "jobs": []})

    return RestBackend(SlurmConfig(backend="rest", rest_user="svc"), transport=httpx.MockTransport(slurmrestd)), seen


class ExpiredTokenSlurmrestd:
    """slurmrestd 22.05 given a JWT past its "exp" (recorded on the dev cluster): GET /jobs answers HTTP 500
    "Unspecified error" from slurm_load_jobs, POST /job/submit HTTP 500 "Zero Bytes were transmitted or received"."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        import httpx

        self.requests.append(request)
        if request.url.path.endswith("/job/submit"):
            return httpx.Response(500, json={"errors": [{"error_code": 5005,
                                                         "error": "Zero Bytes were transmitted or received"}]})
        return httpx.Response(500, json={"errors": [{"description": "Failed while looking for jobs",
                                                     "error_number": -1, "error": "Unspecified error",
                                                     "source": "slurm_load_jobs"}], "jobs": []})


@pytest.mark.parametrize("source", ["environment", "token file"])
def test_an_expired_jwt_is_named_as_expired_not_slurm_unreachable(monkeypatch, tmp_path, source):
    # `scontrol token` makes tokens that last 1800 s by default: a SLURM_JWT set by hand runs out.
    import time

    import httpx

    from hpcllm.slurm.rest_backend import RestBackend

    token = _jwt({"exp": int(time.time()) - 120, "iat": int(time.time()) - 1920, "sun": "svc"})
    fields = {}
    if source == "environment":
        monkeypatch.setenv("SLURM_JWT", token)
    else:
        monkeypatch.delenv("SLURM_JWT", raising=False)
        (tmp_path / "jwt").write_text(f"SLURM_JWT={token}\n")
        fields["rest_token_file"] = tmp_path / "jwt"
    server = ExpiredTokenSlurmrestd()
    backend = RestBackend(SlurmConfig(backend="rest", rest_user="svc", **fields), transport=httpx.MockTransport(server))
    for call in (lambda: backend.statuses(["1"]), lambda: backend.submit(make_job_spec(name="t", script="true"))):
        with pytest.raises(SlurmError) as refused:
            call()
        assert not isinstance(refused.value, SlurmUnavailable)  # not "Slurm is not reachable ... scontrol ping"
        assert "expired" in str(refused.value) and "scontrol token" in str(refused.value)
        assert token not in str(refused.value)
    assert server.requests == []  # nothing sent with a token slurmctld refuses


def test_a_jwt_that_has_not_expired_is_sent(monkeypatch):
    import time

    token = _jwt({"exp": int(time.time()) + 1800, "iat": int(time.time()), "sun": "svc"})
    backend, seen = _token_recording_backend(monkeypatch, token)
    assert backend.statuses(["1"])["1"].missing
    assert seen == [token]


@pytest.mark.parametrize("exp, sent", [
    (10**400, True), ("Infinity", True), ("NaN", True),  # no expiry we could reach: sent, slurmctld judges it
    (-1e20, False),  # long past, before any date the calendar prints: named as expired
])
def test_a_jwt_whose_exp_is_out_of_range_is_judged_not_a_crash(monkeypatch, exp, sent):
    import json

    # json.dumps cannot write 10**400 as a float, and writes Infinity/NaN bare, as a hand-made token may hold them
    token = _jwt(json.dumps({"sun": "svc"})[:-1] + f', "exp": {exp}}}')
    backend, seen = _token_recording_backend(monkeypatch, token)
    if sent:
        assert backend.statuses(["1"])["1"].missing
        assert seen == [token]
    else:
        with pytest.raises(SlurmError, match="expired"):
            backend.statuses(["1"])
        assert seen == []


def test_a_jwt_slurmctld_refuses_is_named_in_the_unspecified_error_of_slurmrestd(monkeypatch):
    # slurmrestd 22.05, X-SLURM-USER-TOKEN not one slurmctld signed (recorded on the dev cluster: a token with a
    # byte changed, or "garbage"): HTTP 500 "Unspecified error" from slurm_load_jobs, as for an expired one.
    import httpx

    from hpcllm.slurm.rest_backend import RestBackend

    monkeypatch.setenv("SLURM_JWT", "garbage")
    backend = RestBackend(SlurmConfig(backend="rest", rest_user="svc"),
                          transport=httpx.MockTransport(ExpiredTokenSlurmrestd()))
    with pytest.raises(SlurmError) as refused:
        backend.statuses(["1"])
    message = str(refused.value)
    assert "Unspecified error" in message  # Slurm's words stay
    assert "JWT" in message and "scontrol token" in message and "garbage" not in message


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_an_unspecified_error_of_a_submit_or_cancel_does_not_blame_the_jwt(monkeypatch, method):
    # Error -1 is Slurm's generic error: a refused submit or cancel answering it says nothing about the token (a
    # refused JWT fails the GETs too, and those say so).
    import time

    import httpx

    from hpcllm.slurm.rest_backend import RestBackend

    monkeypatch.setenv("SLURM_JWT", _jwt({"exp": int(time.time()) + 1800, "sun": "svc"}))

    def slurmrestd(request):
        return httpx.Response(500, json={"errors": [{"error_number": -1, "error": "Unspecified error"}]})

    backend = RestBackend(SlurmConfig(backend="rest", rest_user="svc"), transport=httpx.MockTransport(slurmrestd))
    with pytest.raises(SlurmError) as refused:
        if method == "POST":
            backend.submit(make_job_spec(name="t", script="true"))
        else:
            backend.cancel("7")
    assert "Unspecified error" in str(refused.value) and "JWT" not in str(refused.value)


def test_a_job_refused_over_the_reservation_of_hpcllms_environment_names_that_variable(fake, backend, monkeypatch):
    # The service's jobs run in a reservation where SBATCH_RESERVATION is set in its environment (sbatch reads it;
    # no [slurm] key sets it); once that reservation ends, 22.05's sbatch answers (recorded on the dev cluster):
    stderr = "sbatch: error: Batch job submission failed: Requested reservation is invalid\n"
    fake.on("sbatch", "", stderr=stderr, rc=1)
    monkeypatch.setenv("SBATCH_RESERVATION", "gpu-week-12")
    with pytest.raises(SlurmError) as refused:
        backend.submit(make_job_spec(name="t", script="true"))
    message = str(refused.value)
    assert message.startswith(f"sbatch --parsable failed: {stderr.strip()}")
    assert "SBATCH_RESERVATION=gpu-week-12" in message and "scontrol show reservation" in message
    assert refused.value.slurm_message == stderr.strip()


def test_a_job_slurmrestd_accepted_with_an_error_beside_its_id_is_submitted_not_refused(monkeypatch, caplog):
    # 22.05's slurmrestd, a job asking for a reservation that starts later (recorded on the dev cluster): HTTP 200,
    # the job queued (Reason=Reservation), its id beside an error. A refusal is HTTP 500 without a job_id.
    import logging

    import httpx

    from hpcllm.slurm.rest_backend import RestBackend

    def slurmrestd(request):
        return httpx.Response(200, json={"errors": [{"error_code": 2056,
                                                     "error": "Requested reservation not usable now"}],
                                         "job_id": 86, "step_id": "BATCH", "job_submit_user_msg": ""})

    monkeypatch.setenv("SLURM_JWT", "tok")
    backend = RestBackend(SlurmConfig(backend="rest", rest_user="svc"), transport=httpx.MockTransport(slurmrestd))
    with caplog.at_level(logging.WARNING, logger="hpcllm.slurm.rest_backend"):
        assert backend.submit(make_job_spec(name="t", script="true")) == "86"
    assert any("Requested reservation not usable now" in r.getMessage() and "86" in r.getMessage()
               for r in caplog.records)


def test_where_the_service_runs_in_a_reservation_rest_and_pyslurm_jobs_ask_for_it(monkeypatch):
    # sbatch reads SBATCH_RESERVATION from its environment; slurmrestd and libslurm do not read it from the job's
    # environment (recorded on the 22.05 dev cluster: a REST job with SBATCH_RESERVATION=hbtest in "environment"
    # got no reservation, one with "reservation": "hbtest" got it). nodes() offers only the reservation's nodes.
    from hpcllm.slurm.pyslurm_backend import submit_description_fields
    from hpcllm.slurm.rest_backend import submission_body

    spec = make_job_spec(name="t", script="true")
    monkeypatch.delenv("SBATCH_RESERVATION", raising=False)
    assert "reservation" not in submission_body(spec)["job"]
    assert "reservations" not in submit_description_fields(spec)
    monkeypatch.setenv("SBATCH_RESERVATION", "gpu-week,spare")
    assert submission_body(spec)["job"]["reservation"] == "gpu-week,spare"
    assert submit_description_fields(spec)["reservations"] == ["gpu-week", "spare"]
