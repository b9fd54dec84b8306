"""The agent's watch of ready workers: a worker whose /ready turns 503 (its engine died or hung) or stops answering
is stopped (SIGTERM, then SIGKILL), reported failed in the agent's instance list (what the heartbeat carries, so the
controller routes elsewhere) and its cached copy and GPUs are released; one failed answer is not a death. Workers
are `fake_worker.py` processes switched unhealthy over HTTP; the agent, its cache and its watcher are real."""

from __future__ import annotations

import json
import os
import signal
import threading
import sys
from pathlib import Path

import httpx
import pytest

from hpcllm.node.protocol import StartInstance
from hpcllm.node.tests.test_agent import converted, make_agent, wait_for  # noqa: F401 (converted: a fixture)

MODEL = "tiny-llama"


@pytest.fixture
def make_node(tmp_path):
    """make(*fake worker options, **node settings): an agent with 2 GPUs whose workers are fake ones."""
    made = []

    def make(*worker_options: str, **node):
        node = {"worker_health_seconds": 0.05, "worker_health_timeout_seconds": 0.5, **node}
        agent = make_agent(tmp_path / f"agent{len(made)}", gpus=2, **node)
        record = tmp_path / f"worker{len(made)}.jsonl"
        agent.workers._command = lambda req, path, url_file: [
            sys.executable, "-m", "hpcllm.node.tests.fake_worker", "--url-file", str(url_file), "--record",
            str(record), *worker_options]
        made.append(agent)
        return agent, record

    yield make
    for agent in made:
        agent.workers.stop_all(timeout=5)
        agent.workers.close()


def start_ready(agent, source: Path):
    """An instance on both GPUs, loading from the node's NVMe copy (which its worker then holds), once ready."""
    agent.cache.warm(MODEL, source, "nvme")
    inst = agent.workers.start(StartInstance(model=MODEL, source=str(source), gpu_ids=[0, 1]))
    assert inst.tier == "nvme"
    wait_for(lambda: inst.state == "ready", 30, "the fake worker to be ready")
    assert agent.cache.get(MODEL, "nvme").in_use == 1
    return inst


def turn(inst, answer, count: int | None = None) -> None:
    httpx.post(f"{inst.worker_url}/fake/ready", json={"answer": answer, "count": count}).raise_for_status()


def events(record: Path, name: str) -> list[dict]:
    lines = record.read_text().splitlines() if record.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == name]


def reported(agent, inst) -> dict:
    """The instance as the agent reports it to the controller (heartbeat)."""
    [info] = [i for i in agent.instance_listing()[0] if i.instance_id == inst.instance_id]
    return info.model_dump()


def assert_released(agent, inst) -> None:
    assert inst.done.wait(30), "the watcher did not finish with the stopped worker"
    assert agent.cache.get(MODEL, "nvme").in_use == 0, "the stopped worker's copy is still held"
    assert agent.workers.gpus_in_use() == set()


def test_a_worker_whose_ready_turns_503_is_stopped_reported_failed_and_releases_its_copy_and_gpus(make_node,
                                                                                                   converted):
    agent, record = make_node(worker_health_failures=3)
    inst = start_ready(agent, converted)

    turn(inst, 503)

    wait_for(lambda: inst.state == "failed", 30, "the unhealthy worker to be reported failed")
    info = reported(agent, inst)
    assert info["state"] == "failed"
    assert "unhealthy: 3 health probes" in info["error"] and "HTTP 503" in info["error"], info["error"]
    assert "engine died" in info["error"]
    assert inst.process.wait(30) == 0  # stopped by SIGTERM (the fake worker exits 0 on it)
    assert events(record, "sigterm")
    assert_released(agent, inst)
    again = agent.workers.start(StartInstance(model=MODEL, source=str(converted), gpu_ids=[0, 1]))
    assert again.gpu_ids == [0, 1]  # its GPUs are free for the next instance


def test_a_worker_that_stops_answering_and_ignores_sigterm_is_killed(make_node, converted):
    agent, record = make_node("--ignore-sigterm", worker_health_failures=2, worker_stop_timeout_seconds=1)
    inst = start_ready(agent, converted)

    turn(inst, "hang")

    wait_for(lambda: inst.state == "failed", 30, "the hung worker to be reported failed")
    assert "unhealthy: 2 health probes" in inst.error and "no answer" in inst.error, inst.error
    assert inst.process.wait(30) == -9  # SIGTERM was ignored: SIGKILL after node.worker_stop_timeout_seconds
    assert events(record, "sigterm")
    assert_released(agent, inst)


def test_fewer_failed_probes_than_the_limit_are_not_a_death(make_node, converted):
    agent, record = make_node(worker_health_failures=3)
    inst = start_ready(agent, converted)

    turn(inst, 503, count=2)  # two failed answers, then healthy again

    wait_for(lambda: any(e["answer"] == 200 for e in events(record, "ready")), 30, "a healthy answer again")
    wait_for(lambda: inst.failed_probes == 0, 30, "the watcher to count the healthy answer")
    assert [e["answer"] for e in events(record, "ready")][:3] == [503, 503, 200]
    assert inst.state == "ready" and inst.process.poll() is None and not events(record, "sigterm")


def alive(pid: int) -> bool:
    from hpcllm.node.workers import processes, running

    return bool(running(processes([pid])))


def hold_the_kill(monkeypatch):
    """The watcher's SIGKILL at the stop timeout waits until the returned event is set: until then a process that
    ignores SIGTERM provably still runs, however slow the host."""
    import threading

    from hpcllm.node.workers import WorkerManager

    allowed, overdue = threading.Event(), WorkerManager._kill_when_overdue
    monkeypatch.setattr(WorkerManager, "_kill_when_overdue",
                        lambda self, inst: overdue(self, inst) if allowed.is_set() else None)
    return allowed


def test_a_hung_worker_killed_takes_its_child_processes_with_it(make_node, converted):
    """A worker that ignores SIGTERM is SIGKILLed with the processes it started (a vLLM engine core, hpcllm's model
    process): an orphan would keep the GPU memory the agent hands to the next instance."""
    agent, record = make_node("--ignore-sigterm", "--child", worker_health_failures=2, worker_stop_timeout_seconds=1)
    inst = start_ready(agent, converted)
    [child] = events(record, "child")
    try:
        turn(inst, "hang")
        wait_for(lambda: inst.state == "failed", 30, "the hung worker to be reported failed")
        assert inst.process.wait(30) == -9
        assert_released(agent, inst)
        # SIGKILL is asynchronous
        wait_for(lambda: not alive(child["pid"]), 10, "the killed worker's child process to go")
    finally:
        if alive(child["pid"]):
            os.kill(child["pid"], signal.SIGKILL)


def test_an_unhealthy_tensor_parallel_instance_whose_rank_hangs_is_killed_before_its_gpus_are_free(make_node,
                                                                                                     converted,
                                                                                                     monkeypatch):
    """mpirun exits on SIGTERM without waiting for its ranks: a hung rank (why the instance turned unhealthy) must not
    keep its GPU memory while the agent hands the GPUs to the next instance, nor live on after the stop timeout."""
    from hpcllm.node import workers

    monkeypatch.setattr(workers.shutil, "which", lambda name: f"/usr/bin/{name}")  # the fake worker is "mpirun"
    agent, record = make_node("--child", worker_health_failures=2, worker_stop_timeout_seconds=1)
    kill_allowed = hold_the_kill(monkeypatch)
    inst = agent.workers.start(StartInstance(model=MODEL, source=str(converted), gpu_ids=[0, 1], tensor_parallel=2))
    wait_for(lambda: inst.state == "ready", 30, "the fake worker to be ready")
    [rank] = events(record, "child")
    try:
        turn(inst, 503)
        assert inst.process.wait(30) == 0  # "mpirun" ended on its stop signal; its rank did not
        assert alive(rank["pid"]), "the hung rank is not SIGKILLed yet"
        assert agent.workers.gpus_in_use() == {0, 1}, "GPUs free while a rank of the instance still runs"
        kill_allowed.set()
        assert inst.done.wait(30)
        wait_for(lambda: not alive(rank["pid"]), 10, "the hung rank to go")  # SIGKILL is asynchronous
        assert agent.workers.gpus_in_use() == set()
    finally:
        if alive(rank["pid"]):
            os.kill(rank["pid"], signal.SIGKILL)


def test_a_tensor_parallel_instance_that_outlives_its_stop_signal_is_logged_with_the_signal_sent(make_node, converted,
                                                                                                 monkeypatch, caplog):
    """A tensor-parallel instance's mpirun is stopped with SIGUSR2 (mpirun_stop_signal): the warning before its
    SIGKILL said "within 1 s of SIGTERM", a signal it was never sent, sending an admin to look for the wrong one."""
    from hpcllm.node import workers

    monkeypatch.setattr(workers.shutil, "which", lambda name: f"/usr/bin/{name}")  # the fake worker is "mpirun"
    agent, record = make_node("--ignore-sigterm")
    inst = agent.workers.start(StartInstance(model=MODEL, source=str(converted), gpu_ids=[0, 1], tensor_parallel=2))
    wait_for(lambda: inst.state == "ready", 30, "the fake worker to be ready")
    agent.workers.stop(inst.instance_id, timeout=1)
    assert inst.process.wait(30) == -9 and events(record, "sigusr2") and not events(record, "sigterm")
    assert any(f"{inst.instance_id} did not stop within 1 s of SIGUSR2: SIGKILL" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_kill_after_the_worker_was_reaped_spares_the_process_that_reused_its_pid(make_node, converted):
    """Once the watcher reaped the worker its pid is free: the kill that follows (a stop timeout) signals only the
    processes recorded at the stop, never what now runs under that pid (or under it)."""
    import subprocess

    from hpcllm.node.workers import WorkerManager

    agent, _ = make_node()
    inst = start_ready(agent, converted)
    agent.workers.stop(inst.instance_id, timeout=5)
    assert inst.process.poll() is not None
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        inst.process.pid = bystander.pid  # the freed pid given to an unrelated process
        WorkerManager._kill(inst)
        assert bystander.poll() is None, "an unrelated process that reused the worker's pid was SIGKILLed"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_recorded_rank_whose_pid_was_reused_is_neither_waited_for_nor_killed(make_node, converted):
    """A rank recorded at the stop ended and the kernel gave its pid to another process: that process must not keep
    the instance's GPUs in use (and its watcher running) forever, nor be SIGKILLed at the stop timeout."""
    import subprocess

    from hpcllm.node.workers import Process, WorkerManager, processes

    agent, _ = make_node()
    inst = start_ready(agent, converted)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        [now] = processes([bystander.pid])
        inst.children = [Process(bystander.pid, now.started - 1)]  # the rank that had its pid, started earlier
        agent.workers.stop(inst.instance_id, timeout=5)
        assert inst.done.is_set() and agent.workers.gpus_in_use() == set()
        WorkerManager._kill(inst)
        assert bystander.poll() is None, "an unrelated process that reused a rank's pid was SIGKILLed"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_process_that_outlives_its_sigkill_is_logged_by_pid_and_keeps_its_gpus(make_node, converted,
                                                                                 monkeypatch, caplog):
    """A rank in uninterruptible sleep (a hung driver) survives the SIGKILL: the watcher must say so, naming it,
    not loop silently; its GPUs stay in use while it holds their memory."""
    from hpcllm.node import workers

    monkeypatch.setattr(workers.shutil, "which", lambda name: f"/usr/bin/{name}")  # the fake worker is "mpirun"
    monkeypatch.setattr(workers, "KILL_WAIT_SECONDS", 0.2)
    agent, record = make_node("--child", worker_health_failures=2, worker_stop_timeout_seconds=0.2)
    inst = agent.workers.start(StartInstance(model=MODEL, source=str(converted), gpu_ids=[0, 1], tensor_parallel=2))
    wait_for(lambda: inst.state == "ready", 30, "the fake worker to be ready")
    [rank] = events(record, "child")
    try:
        # The SIGKILL does not take (what uninterruptible sleep does to it): only mpirun, its parent, goes.
        monkeypatch.setattr(workers.WorkerManager, "_kill", staticmethod(lambda inst: inst.process.kill()))
        turn(inst, 503)
        wait_for(lambda: any(str(rank["pid"]) in r.getMessage() and "after SIGKILL" in r.getMessage()
                             for r in caplog.records if r.levelname == "ERROR"), 30, "the error naming the rank")
        assert alive(rank["pid"]) and agent.workers.gpus_in_use() == {0, 1}
    finally:
        if alive(rank["pid"]):
            os.kill(rank["pid"], signal.SIGKILL)


def test_a_worker_that_exits_on_sigterm_leaving_a_hung_child_keeps_its_gpus_until_the_child_is_killed(make_node,
                                                                                                      converted,
                                                                                                      monkeypatch):
    """A single worker ends on SIGTERM but its vLLM engine core (or hpcllm's model process) hangs: the child holds
    the GPU memory, so the GPUs stay in use until it is gone, and the kill at the stop timeout ends it."""
    agent, record = make_node("--child", worker_health_failures=2, worker_stop_timeout_seconds=1)
    kill_allowed = hold_the_kill(monkeypatch)
    inst = start_ready(agent, converted)
    [child] = events(record, "child")
    try:
        turn(inst, 503)
        assert inst.process.wait(30) == 0  # the worker ended on SIGTERM; its child ignores it
        assert alive(child["pid"]), "the child ignores SIGTERM and is not SIGKILLed yet"
        assert agent.workers.gpus_in_use() == {0, 1}, "GPUs free while the worker's child still runs"
        kill_allowed.set()
        assert inst.done.wait(30)
        wait_for(lambda: not alive(child["pid"]), 10, "the hung child to go")  # SIGKILL is asynchronous
        assert_released(agent, inst)
    finally:
        if alive(child["pid"]):
            os.kill(child["pid"], signal.SIGKILL)


def test_a_spare_start_failing_at_a_load_end_leaves_the_instance_watched(make_node, converted, monkeypatch, caplog):
    """A load's end replaces the spare it took: a spare start failing then with any error (the worker's
    environment, an HpcllmError) must not end the instance's watcher, which keeps its copy held and probes its
    health (an unhealthy worker is still stopped)."""
    from hpcllm.errors import HpcllmError

    agent, record = make_node(spare_workers=1, worker_health_failures=2)

    def broken_spare():
        raise HpcllmError("the worker's environment cannot be built")

    monkeypatch.setattr(agent.workers, "_spawn_spare", broken_spare)
    inst = start_ready(agent, converted)
    assert "cannot start a spare worker: the worker's environment" in caplog.text
    turn(inst, 503)
    wait_for(lambda: inst.state == "failed", 30, "the unhealthy worker to be stopped by its watcher")
    assert inst.process.wait(30) == 0 and events(record, "sigterm")
    assert_released(agent, inst)


def test_a_stopped_instance_whose_process_outlives_its_sigkill_keeps_its_gpus(make_node, converted, monkeypatch):
    """stop() forgets the instance, but a process of it that the SIGKILL did not end (uninterruptible sleep in a
    hung driver) holds its GPUs' memory: they are not handed to the next start until it is gone."""
    from hpcllm.node import workers

    monkeypatch.setattr(workers, "KILL_WAIT_SECONDS", 0.2)
    agent, record = make_node("--ignore-sigterm", "--child")
    inst = start_ready(agent, converted)
    [child] = events(record, "child")
    try:
        # The SIGKILL does not take on the child (what uninterruptible sleep does to it): only the worker goes.
        monkeypatch.setattr(workers.WorkerManager, "_kill", staticmethod(lambda inst: inst.process.kill()))
        agent.workers.stop(inst.instance_id, timeout=0.5)
        assert inst.process.poll() is not None and alive(child["pid"])
        assert agent.workers.instances() == [] and agent.workers.gpus_in_use() == {0, 1}
        with pytest.raises(workers.GpusBusy):
            agent.workers.start(StartInstance(model=MODEL, source=str(converted), gpu_ids=[0]))
        os.kill(child["pid"], signal.SIGKILL)  # the driver recovers: the process ends
        assert inst.done.wait(30)
        assert agent.workers.gpus_in_use() == set()
    finally:
        if alive(child["pid"]):
            os.kill(child["pid"], signal.SIGKILL)


class _LockTelling:
    """The worker manager's lock, telling when the thread named `thread` asks for it (the listing may then go on:
    whatever that thread changes under the lock waits for the listing)."""

    def __init__(self, lock, thread: str):
        self._lock, self._thread, self.asked = lock, thread, threading.Event()

    def acquire(self, *args, **kwargs):
        if threading.current_thread().name == self._thread:
            self.asked.set()
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def test_a_report_built_while_an_instances_state_changes_carries_the_version_of_the_state_it_lists(make_node,
                                                                                                     converted):
    """The controller keeps the newest version of a node's reports and drops older ones: a report listing the new
    state with the old version (the state changed while the report was built) would let the earlier report, late,
    turn the state back. Here the instance turns draining while a listing is being built."""
    agent, _ = make_node()
    inst = start_ready(agent, converted)
    reports = [agent.instance_listing()]
    lock = agent.workers._lock = _LockTelling(agent.workers._lock, "state-change")
    change = threading.Thread(target=agent.workers._set_state, args=(inst, "draining"), name="state-change")
    build_info = inst.info

    def info_during_the_change():
        if change.ident is None:  # the first instance listed: the change starts once
            change.start()
            wait_for(lambda: lock.asked.is_set() or not change.is_alive(), 30, "the state change to start")
        return build_info()

    inst.info = info_during_the_change
    reports.append(agent.instance_listing())
    change.join(30)
    reports.append(agent.instance_listing())
    listed = [([i.state for i in infos if i.instance_id == inst.instance_id][0], version) for infos, version in reports]
    assert listed[0][0] == "ready" and listed[-1][0] == "draining"
    states_by_version = {}
    for state, version in listed:
        assert states_by_version.setdefault(version, state) == state, f"version {version} listed both: {listed}"
