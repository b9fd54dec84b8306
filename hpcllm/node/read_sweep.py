"""The node's measurements off the cold-start path (docs/node-agent.md, "Start-up measurements", "Read tuning").

The read sweep (probes.sweep_read_settings: ~60 reads of node.probe_bytes, 3-20 s) finds how this node's tiers read
fastest; the tier probes (probes.measure_tiers, about a second, more under load) give placement the tiers' rates. A
cold start should wait for neither, so the agent:
  1. looks for saved results of an earlier agent on this node (`SavedResult`, `SavedSweep`): one measured with the
     same key (the folders and their filesystems, the probe sizes, the node, hpcllm's version, the file format) no
     older than its max age is used at once, and measured again only in the background;
  2. measures in a background thread (`BackgroundMeasurements`: tier probes first, then the sweep) that yields to
     loads (`IdleGate`): it waits while a worker loads, a spare imports or a loaded copy is cached, and measures
     again what one of those began during; then it saves the results for the next workers (the run folder's
     read-tuning.json) and the next agents.
Tier probes without a fresh saved result run on the start path, before the agent serves (and before its spares).

Where a saved result lives: `<nvme_dir>/.hpcllm-<name>` when the NVMe folder is persistent (it survives the job, and
the cache manager ignores dot files), else `<state_dir>/node/<node>/<name>`; names read-tuning.json (the sweep) and
tier-probe.json (the tier probes).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from hpcllm.store.tuning import ReadTuning, SweepCancelled, SweepGate

log = logging.getLogger(__name__)
T = TypeVar("T")

SWEEP_FORMAT = 1  # bump when the sweep measures differently: older saved results are then measured again


def folder_device(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_dev
    except OSError:
        return None


def measurement_key(node: str, nvme_dir: Path, models_dir: Path, probe_bytes: int, fmt: int = SWEEP_FORMAT) -> dict:
    """What a saved result must match to be reused: a measurement of other filesystems or sizes (or by another
    version, or format `fmt`) says nothing here."""
    from hpcllm.version import __version__

    return {"format": fmt, "hpcllm": __version__, "node": node, "probe_bytes": probe_bytes,
            "disk_device": folder_device(nvme_dir), "sharedfs_device": folder_device(models_dir)}


def saved_result_path(nvme_dir: Path, nvme_scope: str, state_dir: Path, node: str,
                     name: str = "read-tuning.json") -> Path:
    """Where a node's saved result `name` lives: beside the cache on persistent NVMe (as a dot file), else in the
    state folder (job-scoped scratch vanishes with the job)."""
    if nvme_scope == "persistent":
        return nvme_dir / f".hpcllm-{name}"
    return state_dir / "node" / node / name


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one; fsynced, so a crash leaves no empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SavedResult:
    """One node's saved measurement: {"format", "key", "measured_at", field: encode(result)}, reused by later
    agents on the node while it is of their key and no older than max_age_seconds. decode raises ValueError,
    KeyError or TypeError on what it cannot take (the file is then ignored as corrupt)."""

    def __init__(self, path: Path, key: dict, max_age_seconds: float, *, what: str, field: str, max_age_key: str,
                 again: str, decode: Callable[[dict], T], encode: Callable[[T], dict]):
        self.path, self.key, self.max_age_seconds = Path(path), key, max_age_seconds
        self.what, self.field, self.max_age_key, self.again = what, field, max_age_key, again
        self.decode, self.encode = decode, encode

    def load(self, now: float | None = None) -> T | None:
        """The saved result when it is fresh and of this key; None (with a log line saying why) otherwise."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            log.info("no saved %s at %s: %s", self.what, self.path, self.again)
            return None
        except OSError as exc:
            log.warning("cannot read the saved %s %s (%s): %s", self.what, self.path, exc, self.again)
            return None
        try:
            data = json.loads(text)
            key, measured_at = data["key"], float(data["measured_at"])
            result = self.decode(data[self.field])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the corrupt saved %s %s (%s: %s): %s", self.what, self.path,
                        type(exc).__name__, exc, self.again)
            return None
        if key != self.key:
            changed = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
            log.info("the saved %s %s measured something else (%s differ): %s", self.what, self.path,
                     ", ".join(changed), self.again)
            return None
        age = (time.time() if now is None else now) - measured_at
        if not 0 <= age <= self.max_age_seconds:
            log.info("the saved %s %s is %.0f s old (%s = %.0f): %s", self.what, self.path, age, self.max_age_key,
                     self.max_age_seconds, self.again)
            return None
        log.info("using the %s saved %.0f s ago in %s", self.what, age, self.path)
        return result

    def save(self, result: T, measured_at: float) -> None:
        body = {"format": self.key.get("format"), "key": self.key, "measured_at": measured_at,
                self.field: self.encode(result)}
        write_atomically(self.path, json.dumps(body, indent=1))


class SavedSweep(SavedResult):
    """The read sweep's saved result (node.read_sweep_max_age_seconds)."""

    def __init__(self, path: Path, key: dict, max_age_seconds: float):
        super().__init__(path, key, max_age_seconds, what="read sweep", field="tuning",
                         max_age_key="node.read_sweep_max_age_seconds",
                         again="sweeping in the background after registering",
                         decode=ReadTuning.from_dict, encode=ReadTuning.to_dict)


class IdleGate(SweepGate):
    """Lets the sweep run only while the node does not read for a load: `busy()` is the worker manager's answer
    (a worker loading, a spare importing, a loaded copy being cached) and `starts()` counts what began, so a
    configuration measured while something started is measured again. The node must have been quiet for
    `quiet_seconds` (counted from the gate's creation, just after registering, and from the last start or busy
    moment): the controller's first placement usually follows the registration within a second, and its load
    should not share the disk with the sweep's first probe file. `stop` set: SweepCancelled."""

    def __init__(self, busy: Callable[[], bool], starts: Callable[[], int], stop: threading.Event,
                 quiet_seconds: float = 0.0, poll_seconds: float = 0.25):
        self.busy, self.starts, self.stop = busy, starts, stop
        self.quiet_seconds, self.poll_seconds = quiet_seconds, poll_seconds
        self._seen, self._quiet_since = starts(), time.monotonic()

    def wait(self) -> object:
        while True:
            if self.stop.is_set():
                raise SweepCancelled("the agent is stopping")
            starts = self.starts()
            if self.busy() or starts != self._seen:
                self._seen, self._quiet_since = starts, time.monotonic()
            elif time.monotonic() - self._quiet_since >= self.quiet_seconds:
                return starts
            self.stop.wait(self.poll_seconds)

    def disturbed(self, token: object) -> bool:
        return self.starts() != token or self.busy()


@dataclass
class Measurement:
    """One background measurement: `measure(gate)`, then `on_result(result, measured_at)` (Unix time it began)."""

    what: str  # for the logs: "tier probes", "read sweep"
    measure: Callable[[SweepGate], object]
    on_result: Callable[[object, float], None]


class BackgroundMeasurements:
    """Runs measurements one after another in a daemon thread (two never share the disk), all behind one gate.
    Errors are logged and the next one runs (loads keep what they had); a cancelled one (SweepCancelled: the
    agent drains) ends them all."""

    def __init__(self, steps: list[Measurement], gate: SweepGate):
        self.steps, self.gate = steps, gate
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="background-measurements", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for step in self.steps:
                started = time.time()
                try:
                    step.on_result(step.measure(self.gate), started)
                    log.info("%s done in %.1f s", step.what, time.time() - started)
                except SweepCancelled as exc:
                    log.info("%s cancelled: %s", step.what, exc)
                    return
                except Exception:
                    log.exception("%s failed: loads and placement keep the figures they had", step.what)
        finally:
            self.done.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
