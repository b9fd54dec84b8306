"""tests/e2e_helpers.py's control_plane: no Slurm job a test's controller submitted outlives the test.

Slurm, the controller and the gateway are doubles here (the real ones run in every e2e test that uses the
helper); what is checked is the teardown's order and what it cancels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_helpers  # noqa: E402
from hpcllm.config import load_config  # noqa: E402
from hpcllm.controller.allocations import new_allocation_tag  # noqa: E402
from hpcllm.controller.registry import Registry  # noqa: E402
from hpcllm.controller.server import database_url_of  # noqa: E402
from hpcllm.controller.tests.doubles import RecordingBackend  # noqa: E402
from hpcllm.credentials import mint_token  # noqa: E402
from hpcllm.slurm.base import JobState, make_job_spec  # noqa: E402

ADMIN = "helpers-admin"


class FakeProcess:
    """Stands for the controller or gateway process; `on_stop` runs while it stops (its last moments)."""

    def __init__(self, args, on_stop=None):
        self.args, self.on_stop, self.stopped = args, on_stop, False

    def poll(self):
        return 0 if self.stopped else None


def submit_as_controller(registry: Registry, backend: RecordingBackend, settle: bool = True) -> str:
    """What the controller's Allocator.submit writes and sends: an intent and the job's token under a tag, the
    tagged job, then (unless sbatch's answer was lost) the allocation row. The Slurm job id."""
    tag, minted = new_allocation_tag(), mint_token("allocation")
    registry.add_allocation_intent(tag, "tiny", [], "batch", 600, 0.0)
    registry.add_credential(minted.credential_id, "allocation", minted.secret_hash, 0.0, model="tiny", job_tag=tag)
    job_id = backend.submit(make_job_spec(name="hpcllm-pool-tiny", script="sleep 600", comment=tag))
    if settle:
        registry.settle_allocation_intent(tag, job_id)
    return job_id


@pytest.fixture()
def plane(tmp_path, monkeypatch):
    """control_plane over doubles: (config path, registry of the controller's database, Slurm double, order of
    events)."""
    config_path = e2e_helpers.write_e2e_config(tmp_path, secret="s", admin=ADMIN, controller_port=1,
                                               namespace="helpers", gateway_port=2)
    registry = Registry(database_url_of(load_config(config_path)))
    backend = RecordingBackend(partitions=("batch",))
    events: list[str] = []
    stopping = {}

    def start_logged(args, log, env):
        return FakeProcess(args, stopping.get(args[1]))

    def stop_process(proc):
        events.append(f"stop {proc.args[1]}")
        if proc.on_stop:
            proc.on_stop()
        proc.stopped = True

    def admin_status(url, key):  # what the controller would list now
        events.append("list allocations")
        return {"allocations": [{"job_id": a.job_id} for a in registry.allocations(active_only=True)]}

    monkeypatch.setattr(e2e_helpers, "start_logged", start_logged)
    monkeypatch.setattr(e2e_helpers, "stop_process", stop_process)
    monkeypatch.setattr(e2e_helpers, "answers", lambda url, proc, log: True)
    monkeypatch.setattr(e2e_helpers, "admin_status", admin_status)
    monkeypatch.setattr("hpcllm.slurm.cli_backend.CliBackend", lambda *args, **kwargs: backend)
    yield config_path, registry, backend, stopping
    registry.close()


def test_a_job_submitted_while_the_controller_stops_is_cancelled(plane, tmp_path):
    config_path, registry, backend, stopping = plane
    early = submit_as_controller(registry, backend)
    late: list[str] = []
    # The controller's last tick runs while it is told to stop: one allocation settled, one whose answer was lost.
    stopping["controller"] = lambda: late.extend([submit_as_controller(registry, backend),
                                                  submit_as_controller(registry, backend, settle=False)])
    with e2e_helpers.control_plane(tmp_path, config_path, 1, 2, {}, ADMIN):
        pass
    assert len(late) == 2
    left = {job_id: job.state for job_id, job in backend.jobs.items() if not job.state.is_terminal}
    assert left == {}, f"jobs the controller submitted still in Slurm after the test: {left}"
    assert {early, *late} <= {arg for call, arg in backend.calls if call == "cancel"}


def test_jobs_of_other_controllers_and_extra_jobs(plane, tmp_path):
    """Another test's allocation on the shared cluster (another tag) is left alone; extra_jobs are cancelled."""
    config_path, registry, backend, _ = plane
    mine = submit_as_controller(registry, backend)
    theirs = backend.submit(make_job_spec(name="hpcllm-pool-tiny", script="sleep 600", comment=new_allocation_tag()))
    extra = backend.submit(make_job_spec(name="preemptor", script="sleep 600"))
    with e2e_helpers.control_plane(tmp_path, config_path, 1, 2, {}, ADMIN, extra_jobs=lambda: [extra]):
        pass
    assert backend.jobs[mine].state == JobState.CANCELLED
    assert backend.jobs[extra].state == JobState.CANCELLED
    assert backend.jobs[theirs].state == JobState.PENDING
