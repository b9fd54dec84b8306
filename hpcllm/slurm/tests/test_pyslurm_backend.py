"""pyslurm backend: the refusal where pyslurm does not match the site's Slurm (as on the 22.05 dev cluster), and
the mapping onto pyslurm 25.x's API through a stand-in module with the same names."""

from __future__ import annotations

import enum
import types

import pytest

from hpcllm.config import SlurmConfig
from hpcllm.slurm.base import JobState, make_job_spec
from hpcllm.slurm.factory import get_backend
from hpcllm.slurm.errors import SlurmBackendUnsupported, SlurmError, SlurmUnavailable
from hpcllm.slurm.pyslurm_backend import (PyslurmBackend, job_status_from_pyslurm, load_matching_pyslurm,
                                          parse_version)


def _no_pyslurm(name):
    raise ImportError(f"No module named {name!r}")


def test_selected_without_a_matching_pyslurm_explains_and_suggests(monkeypatch):
    monkeypatch.setattr("hpcllm.slurm.pyslurm_backend.site_slurm_version", lambda: (22, 5))
    monkeypatch.setattr("hpcllm.slurm.pyslurm_backend.importlib.import_module", _no_pyslurm)
    with pytest.raises(SlurmBackendUnsupported) as refused:
        get_backend(SlurmConfig(backend="pyslurm"))
    message = str(refused.value)
    assert "Slurm 22.05" in message and "pyslurm X.Y only works with Slurm X.Y" in message
    assert 'backend = "cli"' in message and '"rest"' in message


def test_version_mismatch_is_refused():
    fake = types.SimpleNamespace(__version__="25.11.2")
    with pytest.raises(SlurmBackendUnsupported, match=r"pyslurm 25\.11 is installed but this site runs Slurm 22\.05"):
        load_matching_pyslurm((22, 5), importer=lambda name: fake)


def test_unknown_site_version_is_refused(monkeypatch):
    monkeypatch.setattr("hpcllm.slurm.pyslurm_backend.site_slurm_version", lambda: None)
    fake = types.SimpleNamespace(__version__="25.11.2")
    with pytest.raises(SlurmBackendUnsupported, match="cannot tell which Slurm"):
        load_matching_pyslurm(None, importer=lambda name: fake)


@pytest.mark.parametrize("text, version", [("slurm-wlm 22.05.8", (22, 5)), ("slurm 25.11.2", (25, 11)),
                                           ("25.11.2", (25, 11)), ("", None)])
def test_parse_version(text, version):
    assert parse_version(text) == version


# ------------------------------------------------------------------- a stand-in with pyslurm 25.x's names


class FakeRPCError(Exception):
    pass


def make_fake_pyslurm():
    log = {"submitted": [], "cancelled": [], "requeued": [], "signals": []}

    class JobSubmitDescription:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def submit(self):
            if self.kwargs.get("partitions") == "nope":
                raise FakeRPCError("Invalid partition name specified")
            # pyslurm 25.x _set_signal: a dict's "signal" goes straight into u16() (a Cython uint16_t cast); only
            # the "SIG@T" string form goes through signal_to_num.
            signal = self.kwargs.get("signal")
            if isinstance(signal, dict) and not isinstance(signal.get("signal"), int):
                raise TypeError("an integer is required")
            log["submitted"].append(self.kwargs)
            return 4242

    class Job:
        def __init__(self, job_id, **fields):
            self.id = job_id
            for key, value in fields.items():
                setattr(self, key, value)

        def cancel(self):
            log["cancelled"].append(self.id)

        def requeue(self, hold=False):
            log["requeued"].append(self.id)

        def send_signal(self, signal, steps="children", hurry=False):
            log["signals"].append((self.id, signal, steps))

    class Jobs(dict):
        @staticmethod
        def load(preload_passwd_info=False, frozen=False):
            return Jobs({
                4242: Job(4242, name="a", state="RUNNING", state_reason="None", allocated_nodes="n[1-2]",
                          partition="batch", start_time=1700000000, end_time=1700003600, time_limit=60,
                          requeue_count=1, exit_code=0, comment="hpcllm-alloc-0123abcd"),
                4243: Job(4243, name="b", state="PENDING", state_reason="Resources", allocated_nodes=None,
                          partition="batch", start_time=None, end_time=None, time_limit=None, requeue_count=0,
                          exit_code=None),
            })

    class Node:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Nodes(dict):  # pyslurm's Nodes, like Jobs and Partitions, is a map: iterating it gives the names
        @staticmethod
        def load(preload_passwd_info=False):
            return Nodes({"n1": Node(name="n1", state="MIXED", partitions=["batch"], configured_gres={"gpu": 2},
                                     allocated_gres={"gpu": 1}, total_cpus=4, allocated_cpus=1, real_memory=4096,
                                     allocated_memory=256, reason=None, available_features=["nvme"])})

    class Partition:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Partitions(dict):
        @staticmethod
        def load():
            return Partitions({"batch": Partition(name="batch", state="UP", nodes="n[1-4]", is_default=True,
                                                  max_time=None, priority_tier=1, total_cpus=16, total_nodes=4)})

    class Reservation:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Reservations(dict):
        @staticmethod
        def load():
            return Reservations({"hpcllm": Reservation(name="hpcllm", nodes="n[2-3]", is_active=True),
                                 "class": Reservation(name="class", nodes="n1", is_active=True)})

    module = types.SimpleNamespace(__version__="22.5.1", JobSubmitDescription=JobSubmitDescription, Job=Job,
                                   Jobs=Jobs, Nodes=Nodes, Partitions=Partitions, Reservation=Reservation,
                                   Reservations=Reservations, RPCError=FakeRPCError)
    return module, log


def test_calls_map_onto_pyslurm_25_api():
    module, log = make_fake_pyslurm()
    backend = PyslurmBackend(pyslurm=load_matching_pyslurm((22, 5), importer=lambda name: module))
    spec = make_job_spec(name="t", script="echo hi", partition="batch", time="00:10:00", gpus_per_node=2,
                         signal="USR1@60", requeue=True, mem="1G", nodelist=("n1",), output="/tmp/x-%j.out",
                         env={"A": "1"})
    assert backend.submit(spec) == "4242"
    (fields,) = log["submitted"]
    assert fields["partitions"] == "batch" and fields["time_limit"] == "00:10:00"
    assert fields["gres_per_node"] == "gpu:2" and fields["memory_per_node"] == 1024
    assert fields["signal"] == {"signal": 10, "time": 60, "batch_only": True}  # SIGUSR1 by its number
    assert fields["is_requeueable"] is True and fields["log_files_open_mode"] == "append"
    assert fields["required_nodes"] == ["n1"] and fields["environment"]["A"] == "1"
    assert fields["script"].startswith("#!/bin/bash\n#SBATCH --job-name=t")

    statuses = backend.statuses(["4242", "4243", "1"])
    assert statuses["4242"].state is JobState.RUNNING and statuses["4242"].nodes == ("n1", "n2")
    assert statuses["4242"].time_limit == 3600 and statuses["4242"].restart_count == 1
    assert statuses["4243"].state is JobState.PENDING and statuses["4243"].reason == "Resources"
    assert statuses["1"].missing
    assert {job_id: s.comment for job_id, s in backend.list_jobs().items()} == {
        "4242": "hpcllm-alloc-0123abcd", "4243": None}

    backend.cancel("4242")
    backend.requeue("4242")
    backend.signal("4242", "USR1")
    backend.signal("4242", "TERM", batch_only=False)
    assert log["cancelled"] == [4242] and log["requeued"] == [4242]
    assert log["signals"] == [(4242, "SIGUSR1", "batch"), (4242, "SIGTERM", "all")]

    (node,) = backend.nodes()
    assert (node.name, node.gpus_total, node.gpus_used, node.features) == ("n1", 2, 1, ("nvme",))
    (partition,) = backend.partitions()
    assert partition.is_default and partition.nodes == ("n1", "n2", "n3", "n4")


def test_where_the_service_runs_in_a_reservation_only_that_reservations_nodes_are_available(monkeypatch):
    """SBATCH_RESERVATION=hpcllm holds n2 and n3; n1 is another reservation's (a class's): not the service's."""
    module, _ = make_fake_pyslurm()
    backend = PyslurmBackend(pyslurm=module)
    monkeypatch.setenv("SBATCH_RESERVATION", "hpcllm")
    (node,) = backend.nodes()
    assert node.name == "n1" and not node.available
    monkeypatch.setenv("SBATCH_RESERVATION", "class")
    (node,) = backend.nodes()
    assert node.available
    monkeypatch.setenv("SBATCH_RESERVATION", "ended")
    with pytest.raises(SlurmError, match="Slurm shows no reservation 'ended', which SBATCH_RESERVATION .* or unset "
                                         "it"):
        backend.nodes()
    del module.Reservations  # a pyslurm older than 25.5: a clear error, not an AttributeError's traceback, and no
    # advice to unset a reservation that exists
    with pytest.raises(SlurmError, match=r"cannot read Slurm's reservations, for the nodes of 'ended', .*: this "
                                         r"pyslurm \(22.5.1\) cannot read reservations") as refused:
        backend.nodes()
    assert "unset" not in str(refused.value)


def test_a_flex_or_node_less_reservations_jobs_may_run_on_the_nodes_in_no_reservation(monkeypatch):
    """pyslurm's ReservationFlags (an enum.Flag): FLEX runs on its node n1 and on n4 (in no reservation), not on
    the class's n2; a licence reservation (ANY_NODES, no nodes) on n4. One Reservations.load() per listing."""
    module, _ = make_fake_pyslurm()

    class ReservationFlags(enum.Flag):  # pyslurm 25.5's names
        MAINTENANCE = 1
        FLEX = 2
        ANY_NODES = 4
        SPECIFIC_NODES = 8

    loads = []

    class Reservations(dict):
        @staticmethod
        def load():
            loads.append(1)
            flags = ReservationFlags
            return Reservations({
                "flex": module.Reservation(name="flex", nodes="n1", flags=flags.FLEX | flags.SPECIFIC_NODES),
                "class": module.Reservation(name="class", nodes="n2", flags=flags.SPECIFIC_NODES),
                "licences": module.Reservation(name="licences", nodes=None, flags=flags.ANY_NODES)})

    class Nodes(dict):
        @staticmethod
        def load(preload_passwd_info=False):
            return Nodes({name: types.SimpleNamespace(name=name, state=state, partitions=["batch"],
                                                      configured_gres={}, allocated_gres={}, total_cpus=4,
                                                      allocated_cpus=0, real_memory=4096, allocated_memory=0,
                                                      reason=None)
                          for name, state in (("n1", "IDLE+RESERVED"), ("n2", "IDLE+RESERVED"), ("n4", "IDLE"))})

    module.Reservations, module.Nodes = Reservations, Nodes
    backend = PyslurmBackend(pyslurm=module)
    monkeypatch.setenv("SBATCH_RESERVATION", "flex,licences")
    assert {n.name: n.reservations for n in backend.nodes()} == {"n1": ("flex",), "n2": (), "n4": ("flex", "licences")}
    monkeypatch.setenv("SBATCH_RESERVATION", "licences")
    assert {n.name: n.available for n in backend.nodes()} == {"n1": False, "n2": False, "n4": True}
    assert len(loads) == 2


def test_a_reservation_whose_flags_pyslurm_cannot_read_does_not_break_the_node_listing(monkeypatch):
    """pyslurm 25.5's ReservationFlags (an enum.Flag) refuses flags it has no name for (DAILY, WEEKLY, TIME_FLOAT,
    ...) with a ValueError when .flags is read: a site's recurring reservation leaves the service's nodes listed;
    the service's own reservation so flagged is a SlurmError naming it and the other backends, not a traceback."""
    module, _ = make_fake_pyslurm()

    class RecurringReservation(module.Reservation):
        @property
        def flags(self):
            raise ValueError("65536 is not a valid ReservationFlags")

    class Reservations(dict):
        @staticmethod
        def load():
            return Reservations({"hpcllm": module.Reservation(name="hpcllm", nodes="n1"),
                                 "daily": RecurringReservation(name="daily", nodes="n2")})

    module.Reservations = Reservations
    backend = PyslurmBackend(pyslurm=module)
    monkeypatch.setenv("SBATCH_RESERVATION", "hpcllm")
    (node,) = backend.nodes()
    assert node.available and node.reservations == ("hpcllm",)
    monkeypatch.setenv("SBATCH_RESERVATION", "daily")
    with pytest.raises(SlurmError, match=r"cannot read the flags of reservation 'daily'.*backend = \"cli\""):
        backend.nodes()


def test_pyslurm_errors_become_slurm_errors():
    module, _ = make_fake_pyslurm()
    backend = PyslurmBackend(pyslurm=module)
    with pytest.raises(SlurmError, match=r"Invalid partition name specified -- .* set \[slurm\] partition"):
        backend.submit(make_job_spec(name="t", script="true", partition="nope"))
    with pytest.raises(SlurmError, match="--prefer"):
        backend.submit(make_job_spec(name="t", script="true", prefer="nvme"))
    with pytest.raises(SlurmError, match=r"all of each node's memory \(mem = \"0\""):  # pyslurm drops a 0
        backend.submit(make_job_spec(name="t", script="true", mem="0"))


def test_cancel_of_a_finished_job_is_not_an_error():
    module, _ = make_fake_pyslurm()

    def cancel_finished(self):
        raise FakeRPCError("Job/step already completing or completed")

    module.Job.cancel = cancel_finished
    backend = PyslurmBackend(pyslurm=module)
    backend.cancel("4242")  # as with scancel: the job is gone, which is what a cancel wants

    def controller_down(self):
        raise FakeRPCError("Unable to contact slurm controller (connect failure)")

    module.Job.cancel = controller_down
    with pytest.raises(SlurmError, match="not reachable"):
        backend.cancel("4242")


@pytest.mark.parametrize("words", ["Zero Bytes were transmitted or received",
                                   "Slurm backup controller in standby mode"])
def test_slurmctld_not_answering_a_submit_is_unavailable_not_a_refusal(words):
    # The job may exist: SlurmUnavailable keeps the controller's intent, a SlurmError would drop it.
    module, _ = make_fake_pyslurm()

    def lost(self):
        raise FakeRPCError(words)

    module.JobSubmitDescription.submit = lost
    with pytest.raises(SlurmUnavailable, match=f"Slurm is not reachable: {words}.*check with: scontrol ping"):
        PyslurmBackend(pyslurm=module).submit(make_job_spec(name="t", script="true"))


def test_an_array_task_id_is_a_clear_error_not_a_traceback():
    module, _ = make_fake_pyslurm()
    backend = PyslurmBackend(pyslurm=module)
    for act in (lambda: backend.cancel("12_3"), lambda: backend.signal("12+1", "USR1"),
                lambda: backend.requeue("12_3")):
        with pytest.raises(SlurmError, match="acts on job numbers only"):  # was int("12_3"): ValueError
            act()


def test_statuses_find_array_tasks_and_het_components_by_the_ids_users_give():
    """As the CLI backend does: "500_4" is the array task with its own number 504, "500_7" a task the pending array
    record still holds ("5-9%2"), "510+1" the het job's second component; pyslurm lists jobs by number only."""
    module, _ = make_fake_pyslurm()
    job = module.Job
    common = dict(state_reason="None", partition="batch", start_time=None, end_time=None, time_limit=60,
                  requeue_count=0, exit_code=None, allocated_nodes=None)
    module.Jobs.load = staticmethod(lambda **kwargs: module.Jobs({
        504: job(504, name="task", state="RUNNING", array_id=500, array_task_id=4, array_tasks_waiting=None,
                 heterogeneous_id=0, heterogeneous_offset=0, **{**common, "allocated_nodes": "n1"}),
        500: job(500, name="array", state="PENDING", array_id=500, array_task_id=None, array_tasks_waiting="5-9",
                 heterogeneous_id=0, heterogeneous_offset=0, **common),
        510: job(510, name="het", state="RUNNING", array_id=None, array_task_id=None, array_tasks_waiting=None,
                 heterogeneous_id=510, heterogeneous_offset=0, **common),
        511: job(511, name="het", state="PENDING", array_id=None, array_task_id=None, array_tasks_waiting=None,
                 heterogeneous_id=510, heterogeneous_offset=1, **common),
    }))
    statuses = PyslurmBackend(pyslurm=module).statuses(["500_4", "500_7", "510+1", "510", "500_12"])
    assert (statuses["500_4"].job_id, statuses["500_4"].state, statuses["500_4"].nodes) == (
        "500_4", JobState.RUNNING, ("n1",))
    assert statuses["500_7"].state is JobState.PENDING and not statuses["500_7"].missing
    assert (statuses["510+1"].job_id, statuses["510+1"].state) == ("510+1", JobState.PENDING)
    assert statuses["510"].state is JobState.RUNNING
    assert statuses["500_12"].missing  # no such task


def test_a_job_killed_by_a_signal_reports_128_plus_the_signal():
    module, _ = make_fake_pyslurm()
    killed = module.Job(7, name="k", state="CANCELLED", state_reason="None", allocated_nodes="n1",
                        partition="batch", start_time=1, end_time=2, time_limit=1, requeue_count=0, exit_code=0,
                        exit_code_signal=9)
    assert job_status_from_pyslurm(killed).exit_code == 137
