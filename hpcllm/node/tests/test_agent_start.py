"""A node agent's start on a node an agent ran on before: it registers with the tier rates saved there (no probe on
its start path), its spare starts before it registers, and it probes again in the background once the node is idle,
sending the controller the new rates; a stale, foreign or corrupt saved result is probed at start as before."""

from __future__ import annotations

import json
import threading
import time

import pytest
from pydantic import model_validator

from hpcllm.errors import ConfigError
from hpcllm.node.app import create_app
from hpcllm.node.probes import ProbeResult, TierMeasurements
from hpcllm.node.workers import drain_signal
from hpcllm.node.tests.test_agent import make_agent, wait_for
from hpcllm.node.tests.test_agent_controller import controllers  # noqa: F401 (fixture)
from hpcllm.node.tests.test_read_sweep import restore_signals  # noqa: F401 (fixture)
from hpcllm.store.tuning import ReadConfig, ReadTuning, TierTuning

MiB = 1 << 20


def rates(nvme: float, sharedfs: float = 1.25, dram: float = 30.0) -> TierMeasurements:
    return TierMeasurements(nvme=ProbeResult(nvme, "odirect", MiB, 0.1),
                            sharedfs=ProbeResult(sharedfs, "buffered", MiB, 1),
                            dram=ProbeResult(dram, "memcpy", MiB, 0.01))


class CountingProbe:
    """The tier probes of a test: counts its calls, notes what the agent had done when each began, and returns
    `figures` (the next of them on each call)."""

    def __init__(self, *figures: TierMeasurements):
        self.figures, self.calls, self.spares_during, self.registered_during = list(figures), 0, [], []
        self.agent = None

    def __call__(self, with_h2d: bool) -> TierMeasurements:
        self.calls += 1
        self.spares_during.append(len(self.agent.workers._spares))
        self.registered_during.append(self.agent.registered)
        return self.figures[min(self.calls, len(self.figures)) - 1]


def agent_with(tmp_path, probe: CountingProbe, **node):
    agent = make_agent(tmp_path, probe=probe, read_sweep=False, **node)
    agent.read_sweep_quiet_seconds = 0.0
    probe.agent = agent
    return agent


def save_rates(tmp_path, figures: TierMeasurements, **node) -> None:
    """What an earlier agent on the node left: its tier probes, saved."""
    earlier = agent_with(tmp_path, CountingProbe(figures), **node)
    try:
        assert earlier.prepare_tiers() is True  # nothing saved before it: it probed
    finally:
        earlier.workers.close()


def controller_rates(service, node_id: str) -> tuple[float | None, float | None]:
    [node] = [n for n in service.controller.status().nodes if n.node_id == node_id]
    return node.tiers.nvme.read_gbps, node.tiers.sharedfs.read_gbps


@pytest.mark.parametrize("saved", [True, False], ids=["saved-rates", "probes-at-start"])
def test_the_spare_starts_before_registering_and_saved_rates_skip_the_probes(
        tmp_path, controllers, monkeypatch, restore_signals, saved):  # noqa: F811
    (service, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n5")
    if saved:
        save_rates(tmp_path, rates(nvme=3.5))
    probe = CountingProbe(rates(nvme=2.5))
    agent = agent_with(tmp_path, probe, spare_workers=1)
    agent.controller_url = url
    seen_at_registration = []
    register = service.controller.register

    def register_and_note(reg, *args, **kwargs):  # what the agent had done when the controller got its registration
        seen_at_registration.append((probe.calls, len(agent.workers._spares)))
        return register(reg, *args, **kwargs)

    monkeypatch.setattr(service.controller, "register", register_and_note)
    agent.start_background_measurements = lambda: None  # this test is about the start path alone

    def drain_once_registered():
        try:
            wait_for(lambda: agent.registered, 60, "the registration")
        finally:
            agent.request_drain("test over")

    watcher = threading.Thread(target=drain_once_registered, daemon=True)
    watcher.start()
    assert agent.run(create_app) == 0  # in the main thread: it installs its signal handlers
    watcher.join(10)

    [(probes, spares)] = seen_at_registration
    assert spares == 1  # the spare imported while the agent registered
    if saved:
        assert probes == 0 and controller_rates(service, "n5") == (3.5, 1.25)  # the earlier agent's rates
    else:
        assert probes == 1 and probe.spares_during == [0]  # probed before any spare imported
        assert controller_rates(service, "n5") == (2.5, 1.25)
    assert agent.workers._spares == []  # the drain retired it


def test_the_background_probes_update_the_rates_the_controller_places_with_and_are_saved(
        tmp_path, controllers, monkeypatch):  # noqa: F811
    (service, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n6")
    save_rates(tmp_path, rates(nvme=3.5))
    probe = CountingProbe(rates(nvme=6.0, sharedfs=0.75))
    agent = agent_with(tmp_path, probe)
    agent.controller_url = url
    try:
        assert agent.prepare_tiers() is False and probe.calls == 0
        agent.start_server(create_app(agent))
        assert agent.register() and controller_rates(service, "n6") == (3.5, 1.25)
        assert agent.start_background_measurements().done.wait(30)
        assert probe.calls == 1 and probe.registered_during == [True]  # after registering, never before
        assert agent.heartbeat()  # the next heartbeat (woken at once by run's loop) carries the new rates
        assert controller_rates(service, "n6") == (6.0, 0.75)
        saved = json.loads(agent.saved_tiers().path.read_text())
        assert saved["tiers"]["nvme"]["read_gbps"] == 6.0  # for the next agent on the node
    finally:
        agent.shutdown()

    again = agent_with(tmp_path, CountingProbe(rates(nvme=1.0)))  # the next job's agent on the node
    try:
        assert again.prepare_tiers() is False and again.registration().tiers.nvme.read_gbps == 6.0
    finally:
        again.workers.close()


@pytest.mark.parametrize("spoil, reason", [
    (lambda body: {**body, "measured_at": body["measured_at"] - 8 * 24 * 3600}, "old"),
    (lambda body: {**body, "key": {**body["key"], "probe_bytes": 64 * MiB}}, "measured something else"),
    (lambda body: {**body, "key": {**body["key"], "nvme_dir": "/elsewhere/%j"}}, "measured something else"),
    (lambda body: {**body, "key": {**body["key"], "hpcllm": "0.0.1"}}, "measured something else"),
    (lambda body: {**body, "key": {**body["key"], "h2d_gpu": "3"}}, "measured something else"),
    (lambda body: {**body, "tiers": {**body["tiers"], "nvme": {**body["tiers"]["nvme"], "read_gbps": "fast"}}},
     "corrupt"),
    (lambda body: {**body, "tiers": {**body["tiers"], "nvme": {**body["tiers"]["nvme"], "read_gbps": 1e9}}},
     "corrupt"),  # beyond what the controller takes (MAX_GBPS): registering with it would fail
    (lambda body: "{not json", "corrupt"),
])
def test_a_stale_foreign_or_corrupt_saved_result_is_probed_at_start(tmp_path, monkeypatch, caplog, spoil, reason):
    monkeypatch.setenv("SLURMD_NODENAME", "n4")
    save_rates(tmp_path, rates(nvme=3.5))
    probe = CountingProbe(rates(nvme=2.5))
    agent = agent_with(tmp_path, probe)
    path = agent.saved_tiers().path
    spoiled = spoil(json.loads(path.read_text()))
    path.write_text(spoiled if isinstance(spoiled, str) else json.dumps(spoiled))
    try:
        with caplog.at_level("INFO", logger="hpcllm.node.read_sweep"):
            assert agent.prepare_tiers() is True
        assert reason in caplog.text and probe.calls == 1
        assert agent.registration().tiers.nvme.read_gbps == 2.5
        assert agent.start_background_measurements() is None  # probed at start: nothing to probe again
        assert json.loads(path.read_text())["key"] == agent.saved_tiers().key  # saved again, with this key
    finally:
        agent.workers.close()


def test_a_controller_that_takes_no_rates_in_heartbeats_keeps_the_registered_ones_and_the_node_alive(
        tmp_path, controllers, monkeypatch):  # noqa: F811
    import hpcllm.controller.app as controller_app
    from hpcllm.controller.protocol import Heartbeat

    class OlderHeartbeat(Heartbeat):  # a controller of the version before heartbeats carried tiers
        @model_validator(mode="before")
        @classmethod
        def _no_rates(cls, data):
            if isinstance(data, dict) and {"tiers", "h2d_gbps"} & set(data):
                raise ValueError("tiers: Extra inputs are not permitted")  # pydantic's extra=forbid names it
            return data

    (service, _, url), _ = controllers
    monkeypatch.setattr(controller_app, "Heartbeat", OlderHeartbeat)
    monkeypatch.setenv("SLURMD_NODENAME", "n6")
    save_rates(tmp_path, rates(nvme=3.5))
    agent = agent_with(tmp_path, CountingProbe(rates(nvme=6.0)))
    agent.controller_url = url
    try:
        agent.prepare_tiers()
        agent.start_server(create_app(agent))
        assert agent.register()
        assert agent.start_background_measurements().done.wait(30)
        last_heartbeat = service.controller.status().nodes[0].last_heartbeat
        assert agent.heartbeat()  # refused with the rates, sent again without them
        [node] = service.controller.status().nodes
        assert node.last_heartbeat > last_heartbeat and controller_rates(service, "n6") == (3.5, 1.25)
        assert agent.heartbeat()  # the next ones carry no rates
    finally:
        agent.shutdown()


@pytest.mark.parametrize("saved", [True, False], ids=["saved-rates", "probes-at-start"])
def test_the_background_probes_run_before_the_sweep_whose_rate_then_reaches_the_controller(
        tmp_path, controllers, monkeypatch, saved):  # noqa: F811
    (service, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    if saved:
        save_rates(tmp_path, rates(nvme=3.5))
    probe, order = CountingProbe(rates(nvme=6.0, sharedfs=0.75)), []

    def sweep(gate):
        order.append(("sweep", probe.calls))
        return swept(agent.nvme_dir, odirect=8.0, mmap=12.0)

    agent = make_agent(tmp_path, probe=probe, sweep=sweep)
    agent.read_sweep_quiet_seconds = 0.0
    probe.agent = agent
    agent.controller_url = url
    try:
        agent.prepare_tiers()
        agent.prepare_read_settings()  # no saved sweep: it runs in the background too
        agent.start_server(create_app(agent))
        assert agent.register() and controller_rates(service, "n7") == ((3.5, 1.25) if saved else (6.0, 0.75))
        assert agent.start_background_measurements().done.wait(30)
        assert order == [("sweep", 1)]  # saved: one after the other, the probes first, never sharing the disk
        assert agent.heartbeat()
        assert controller_rates(service, "n7") == (8.0, 0.75)  # nvme: the sweep's O_DIRECT rate; the rest probed
    finally:
        agent.shutdown()


def test_the_next_job_reuses_the_rates_with_job_scoped_scratch(tmp_path, monkeypatch):
    """Each job's scratch folder (/scratch/%j) is new, on the same filesystem: the saved rates (in the state
    folder) are the next job's."""
    monkeypatch.setenv("SLURMD_NODENAME", "n3")
    scratch = {"nvme_dir": str(tmp_path / "scratch" / "%j"), "nvme_scope": "job"}
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    save_rates(tmp_path, rates(nvme=3.5), **scratch)
    monkeypatch.setenv("SLURM_JOB_ID", "102")
    probe = CountingProbe(rates(nvme=2.5))
    agent = agent_with(tmp_path, probe, **scratch)
    try:
        assert agent.prepare_tiers() is False and probe.calls == 0
        assert agent.registration().tiers.nvme.read_gbps == 3.5 and agent.nvme_dir.name == "102"
    finally:
        agent.workers.close()


def test_probe_max_age_zero_probes_at_every_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "n3")
    save_rates(tmp_path, rates(nvme=3.5), probe_max_age_seconds=0)
    probe = CountingProbe(rates(nvme=2.5))
    agent = agent_with(tmp_path, probe, probe_max_age_seconds=0)
    try:
        assert agent.prepare_tiers() is True and probe.calls == 1
    finally:
        agent.workers.close()


def swept(folder, **gbps_by_mode) -> ReadTuning:
    import os

    best = {mode: ReadConfig(mode, 8, 4 * MiB, gbps) for mode, gbps in gbps_by_mode.items()}
    return ReadTuning({"disk": TierTuning(str(folder), os.stat(folder).st_dev, best, MiB, time.time())})


def test_placement_gets_the_read_sweeps_rate_of_the_modes_loads_read_a_tier_with(tmp_path, monkeypatch):
    """Loads read with the sweep's best settings (several requests in flight): its figure, not the probe's one
    request at a time, is the rate a load reads at. Mapped reads are left out: a load onto a GPU or into a
    worker's reserved pool never maps the files."""
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    agent = agent_with(tmp_path, CountingProbe(rates(nvme=2.5)))
    try:
        agent.prepare_tiers()
        assert agent.registration().tiers.nvme.read_gbps == 2.5  # no sweep yet: the probe's figure
        agent.use_read_tuning(swept(agent.nvme_dir, odirect=5.5, buffered=4.0, mmap=9.0))
        tiers = agent.registration().tiers
        assert (tiers.nvme.read_gbps, tiers.sharedfs.read_gbps) == (5.5, 1.25)  # the shared FS was not swept
        agent.use_read_tuning(swept(agent.nvme_dir, mmap=9.0))  # O_DIRECT and buffered not measured: the probe's
        assert agent.registration().tiers.nvme.read_gbps == 2.5
    finally:
        agent.workers.close()


def test_an_agent_replaced_by_another_process_on_its_node_stops_its_workers_and_exits(
        tmp_path, controllers, monkeypatch, restore_signals, caplog):  # noqa: F811
    """Two `hpcllm node` on one node (one job): the second registered the node, and the controller answers each
    heartbeat of the first 409 agent_replaced. The first logged 'heartbeat answered HTTP 409' every period for ever
    and kept its spare (and workers) for nothing. Now it logs one error, drains and exits."""
    (service, _, url), _ = controllers
    monkeypatch.setenv("SLURMD_NODENAME", "n5")
    first = agent_with(tmp_path / "first", CountingProbe(rates(nvme=2.5)), spare_workers=1)
    second = make_agent(tmp_path / "second")
    first.controller_url = second.controller_url = url
    first.start_background_measurements = lambda: None  # this test is about the heartbeats alone
    drained_when_replaced = []

    def replace_the_first():
        try:
            wait_for(lambda: first.registered and first.workers._spares, 60, "the first agent to serve")
            assert second.register()
            first.wake_heartbeat()
            drained_when_replaced.append(first._drain_requested.wait(60))
        finally:
            first.request_drain("test over")  # the test's end (nothing more once the first drains of itself)

    watcher = threading.Thread(target=replace_the_first, daemon=True)
    watcher.start()
    try:
        assert first.run(create_app) == 0
        watcher.join(60)
    finally:
        second.shutdown()
    assert drained_when_replaced == [True]
    assert first.state == "stopped" and first.workers._spares == []
    assert caplog.text.count("another agent process registered node n5") == 1
    assert "heartbeat answered HTTP 409" not in caplog.text
    [node] = service.controller.status().nodes
    assert node.state == "up"  # the second agent's node: the first's drain told the controller nothing


def test_a_drain_signal_during_the_start_up_probes_starts_no_spare(tmp_path, restore_signals):  # noqa: F811
    """scancel (SIGTERM) while the agent still probes: it drains and exits without starting a spare worker, whose
    imports and host pool the drain would only wait for (up to 5 s) and then kill."""
    agent = None

    def probe_then_signal(with_h2d: bool) -> TierMeasurements:
        agent.request_drain("SIGTERM")  # what the signal handler does, arriving while the probes run
        return rates(nvme=2.5)

    agent = make_agent(tmp_path, probe=probe_then_signal, read_sweep=False, spare_workers=1)
    assert agent.run(create_app) == 0
    assert agent.workers.starts == 0 and agent.workers._spares == []
    assert agent.state == "stopped" and not agent.registered


@pytest.mark.parametrize("setting", ["10", "SIGUSR1", "usr1"])
def test_a_drain_signal_given_by_number_drains_the_agent_and_spares_its_workers(tmp_path, restore_signals,
                                                                                setting):  # noqa: F811
    """slurm.signal takes a name or a number (it goes into the sbatch script as is): by number, the agent must still
    catch it (else SIGUSR1's default action ends it at once, with no drain) and its workers ignore it."""
    import signal

    agent = make_agent(tmp_path)
    agent.config.slurm.signal = setting
    try:
        agent.install_signal_handlers()
        assert callable(signal.getsignal(signal.SIGUSR1))
        assert drain_signal(agent.config) == signal.SIGUSR1
        signal.raise_signal(signal.SIGUSR1)
        assert agent._drain_requested.is_set()
    finally:
        agent.workers.close()


@pytest.mark.parametrize("setting", ["KILL", "SIGSTOP", "9", "19"])
def test_a_drain_signal_no_process_can_catch_is_a_config_error_saying_what_to_set(tmp_path, restore_signals,
                                                                                    setting):  # noqa: F811
    """slurm.signal = KILL or STOP (or 9, 19): the agent could never drain on it; a clear error at start, not the
    OSError traceback signal.signal raises."""
    agent = make_agent(tmp_path)
    agent.config.slurm.signal = setting
    try:
        with pytest.raises(ConfigError, match=r"slurm.signal = .* no process can catch: set a signal .* USR1"):
            agent.install_signal_handlers()
    finally:
        agent.workers.close()
