"""The read sweep off the cold-start path: the agent registers before it, a later agent reuses its saved result,
an expired, foreign or corrupt saved result is measured again, and the sweep yields to loads."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import pytest

from hpcllm.node.app import create_app
from hpcllm.node.read_sweep import IdleGate
from hpcllm.node.tests.test_agent import make_agent
from hpcllm.node.tests.test_agent_controller import controllers, start_controller  # noqa: F401 (fixture)
from hpcllm.store import tuning as tuning_module
from hpcllm.store.tuning import TUNING_ENV, ReadConfig, ReadTuning, SweepCancelled, SweepGate, TierTuning

MiB = 1 << 20


def a_tuning(folder, gbps: float = 1.5) -> ReadTuning:
    import os

    return ReadTuning({"disk": TierTuning(str(folder), os.stat(folder).st_dev,
                                          {"mmap": ReadConfig("mmap", 8, 4 * MiB, gbps)}, MiB, time.time())})


class SlowSweep:
    """Stands in for the real sweep: takes `seconds`, notes when it ran and whether the agent had registered."""

    def __init__(self, agent_box: list, seconds: float = 2.0):
        self.agent_box, self.seconds = agent_box, seconds
        self.calls, self.started_at, self.ended_at, self.registered_at_start = 0, None, None, None

    def __call__(self, gate: SweepGate) -> ReadTuning:
        self.calls += 1
        agent = self.agent_box[0]
        self.registered_at_start = agent.registered
        self.started_at = time.monotonic()
        gate.wait()
        time.sleep(self.seconds)
        self.ended_at = time.monotonic()
        return a_tuning(agent.nvme_dir)


def fail_if_swept(gate):
    pytest.fail("the agent swept although a fresh result was saved")


def prepared(tmp_path, sweep, **node):
    agent = make_agent(tmp_path, sweep=sweep, **node)
    agent.read_sweep_quiet_seconds = 0.0
    agent.measure()
    agent.prepare_read_settings()
    return agent


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_agent_registers_without_waiting_for_the_sweep_and_saves_it_afterwards(
        tmp_path, controllers, monkeypatch, restore_signals):  # noqa: F811
    (service, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n5")
    box = []
    sweep = SlowSweep(box, seconds=3.0)
    agent = make_agent(tmp_path, sweep=sweep)
    agent.read_sweep_quiet_seconds = 0.5
    box.append(agent)
    agent.controller_url = url
    registered_at = []

    def watch():
        deadline = time.monotonic() + 60
        while not agent.registered and time.monotonic() < deadline:
            time.sleep(0.02)
        registered_at.append(time.monotonic())
        deadline = time.monotonic() + 60
        while (agent.background is None or not agent.background.done.is_set()) and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.request_drain("test over")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert agent.run(create_app) == 0  # measure, serve, register, sweep in the background, drain
    watcher.join(10)

    assert [n.node_id for n in service.controller.status().nodes] == ["n5"]
    assert sweep.calls == 1 and sweep.registered_at_start is True  # never before registration
    assert registered_at[0] < sweep.ended_at  # registration did not wait for the sweep
    # the result: for this agent's next workers, and saved for the next agents on the node
    assert ReadTuning.load(agent.workers._environment([])[TUNING_ENV]) == agent.read_tuning
    saved = json.loads((agent.saved_sweep().path).read_text())
    assert saved["key"]["node"] == "n5" and saved["key"]["probe_bytes"] == MiB
    assert ReadTuning.from_dict(saved["tuning"]) == agent.read_tuning


def test_a_second_agent_uses_the_saved_sweep_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "n6")
    box = []
    first = prepared(tmp_path, SlowSweep(box, seconds=0.0))
    box.append(first)
    assert first.start_background_measurements().done.wait(30)

    second = prepared(tmp_path, fail_if_swept)  # the next job's agent on the same node
    try:
        assert second.read_tuning == first.read_tuning
        assert second.start_background_measurements() is None
        # its workers load with it from the start
        assert ReadTuning.load(second.workers._environment([])[TUNING_ENV]) == first.read_tuning
    finally:
        first.workers.close()
        second.workers.close()


@pytest.mark.parametrize("spoil, reason", [
    (lambda body: {**body, "measured_at": body["measured_at"] - 8 * 24 * 3600}, "old"),
    (lambda body: {**body, "key": {**body["key"], "probe_bytes": 64 * MiB}}, "measured something else"),
    (lambda body: {**body, "key": {**body["key"], "disk_device": -1}}, "measured something else"),
    (lambda body: "{not json", "corrupt"),
    (lambda body: {"tuning": body["tuning"]}, "corrupt"),
])
def test_an_expired_foreign_or_corrupt_saved_sweep_is_measured_again(tmp_path, monkeypatch, caplog, spoil, reason):
    monkeypatch.setenv("SLURMD_NODENAME", "n4")
    box = []
    first = prepared(tmp_path, SlowSweep(box, seconds=0.0))
    box.append(first)
    assert first.start_background_measurements().done.wait(30)
    path = first.saved_sweep().path
    spoiled = spoil(json.loads(path.read_text()))
    path.write_text(spoiled if isinstance(spoiled, str) else json.dumps(spoiled))

    box.clear()
    sweep = SlowSweep(box, seconds=0.0)
    with caplog.at_level(logging.INFO, logger="hpcllm.node.read_sweep"):
        second = prepared(tmp_path, sweep)
    box.append(second)
    try:
        assert reason in caplog.text
        assert second.read_tuning is None  # the tier defaults until the sweep is done
        assert second.start_background_measurements().done.wait(30) and sweep.calls == 1
        assert json.loads(path.read_text())["key"] == second.saved_sweep().key  # saved again, readable
        assert second.read_tuning is not None
    finally:
        first.workers.close()
        second.workers.close()


def test_the_sweep_is_off_when_read_sweep_is_false(tmp_path):
    agent = prepared(tmp_path, fail_if_swept, read_sweep=False)
    try:
        assert agent.start_background_measurements() is None and TUNING_ENV not in agent.workers._environment([])
    finally:
        agent.workers.close()


def test_the_gate_waits_while_the_node_loads_and_a_load_that_began_remeasures_the_configuration(tmp_path):
    busy, starts, stop = [True], [0], threading.Event()
    gate = IdleGate(lambda: busy[0], lambda: starts[0], stop, poll_seconds=0.02)
    passed = threading.Event()
    threading.Thread(target=lambda: (gate.wait(), passed.set()), daemon=True).start()
    assert not passed.wait(0.3)  # a worker is loading: the sweep waits
    busy[0] = False
    assert passed.wait(5)

    # a load that starts during a configuration's read makes it measured again (the real sweep over a file)
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * MiB)
    reads = []
    real = tuning_module._timed_read

    def timed_read(*args):
        reads.append(args)
        if len(reads) == 1:
            starts[0] += 1  # a worker started while the first configuration was read
        return real(*args)

    tuning_module._timed_read = timed_read
    try:
        results = tuning_module.sweep_read([data], modes=("buffered",), threads=(1, 2), blocks=(MiB,), gate=gate)
    finally:
        tuning_module._timed_read = real
    assert len(results) == 2 and len(reads) == 3  # the disturbed configuration was read twice


def test_the_gate_opens_only_after_the_node_was_quiet_for_a_while():
    starts, stop = [0], threading.Event()
    created = time.monotonic()
    gate = IdleGate(lambda: False, lambda: starts[0], stop, quiet_seconds=0.6, poll_seconds=0.02)
    passed = []
    waiting = threading.Thread(target=lambda: (gate.wait(), passed.append(time.monotonic())), daemon=True)
    waiting.start()
    time.sleep(0.3)
    starts[0] += 1  # the controller's first placement right after registering: the quiet time starts again
    changed = time.monotonic()
    waiting.join(5)
    assert passed and passed[0] - changed >= 0.55 and passed[0] - created >= 0.85
    stop.set()
    with pytest.raises(SweepCancelled):
        gate.wait()


def test_a_drain_cancels_a_waiting_sweep_and_nothing_is_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "n3")
    box = []
    sweep = SlowSweep(box, seconds=0.0)
    agent = prepared(tmp_path, sweep)
    box.append(agent)
    monkeypatch.setattr(agent.workers, "busy", lambda: True)  # a load that does not end
    try:
        running = agent.start_background_measurements()
        assert not running.done.wait(0.5)
        agent.drain()
        assert running.done.wait(10)
        assert agent.read_tuning is None and not agent.saved_sweep().path.exists()
    finally:
        agent.shutdown()
