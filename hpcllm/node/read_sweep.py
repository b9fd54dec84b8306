"""The read-settings sweep off the cold-start path (docs/node-agent.md, "Read tuning").

The sweep (probes.sweep_read_settings: ~60 reads of node.probe_bytes, 3-20 s) finds how this node's tiers read
fastest. A cold start must not wait for it, so the agent:
  1. looks for a saved result of an earlier agent on this node (`SavedSweep`): one measured with the same key (the
     folders' filesystems, the probe size, the node, the file format) no older than node.read_sweep_max_age_seconds
     is used at once, and nothing is swept;
  2. otherwise registers and serves with the tier defaults, and sweeps in a background thread (`BackgroundSweep`)
     that yields to loads (`IdleGate`): it waits while a worker loads, a spare imports or a loaded copy is cached,
     and measures a configuration again when one of those began during it; then it saves the result for the next
     workers (the run folder's read-tuning.json) and the next agents (`SavedSweep`).

Where the saved result lives: `<nvme_dir>/.hpcllm-read-tuning.json` when the NVMe folder is persistent (it survives
the job, and the cache manager ignores dot files), else `<state_dir>/node/<node>/read-tuning.json`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from hpcllm.store.tuning import ReadTuning, SweepCancelled, SweepGate

log = logging.getLogger(__name__)

SWEEP_FORMAT = 1  # bump when the sweep measures differently: older saved results are then measured again
SAVED_NAME_IN_NVME = ".hpcllm-read-tuning.json"


def folder_device(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_dev
    except OSError:
        return None


def sweep_key(node: str, nvme_dir: Path, models_dir: Path, probe_bytes: int) -> dict:
    """What a saved result must match to be reused: a sweep of other filesystems or sizes says nothing here."""
    from hpcllm.version import __version__

    return {"format": SWEEP_FORMAT, "hpcllm": __version__, "node": node, "probe_bytes": probe_bytes,
            "disk_device": folder_device(nvme_dir), "sharedfs_device": folder_device(models_dir)}


def saved_sweep_path(nvme_dir: Path, nvme_scope: str, state_dir: Path, node: str) -> Path:
    if nvme_scope == "persistent":
        return nvme_dir / SAVED_NAME_IN_NVME
    return state_dir / "node" / node / "read-tuning.json"  # job-scoped scratch vanishes with the job


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one; fsynced, so a crash leaves no empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SavedSweep:
    """One node's saved sweep result: {"format", "key", "measured_at", "tuning"}."""

    def __init__(self, path: Path, key: dict, max_age_seconds: float):
        self.path, self.key, self.max_age_seconds = Path(path), key, max_age_seconds

    def load(self, now: float | None = None) -> ReadTuning | None:
        """The saved tuning when it is fresh and of this key; None (with a log line saying why) otherwise."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            log.info("no saved read sweep at %s: sweeping in the background after registering", self.path)
            return None
        except OSError as exc:
            log.warning("cannot read the saved read sweep %s (%s): sweeping again", self.path, exc)
            return None
        try:
            data = json.loads(text)
            key, measured_at = data["key"], float(data["measured_at"])
            tuning = ReadTuning.from_dict(data["tuning"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the corrupt saved read sweep %s (%s: %s): sweeping again", self.path,
                        type(exc).__name__, exc)
            return None
        if key != self.key:
            changed = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
            log.info("the saved read sweep %s measured something else (%s differ): sweeping again", self.path,
                     ", ".join(changed))
            return None
        age = (time.time() if now is None else now) - measured_at
        if not 0 <= age <= self.max_age_seconds:
            log.info("the saved read sweep %s is %.0f s old (node.read_sweep_max_age_seconds = %.0f): sweeping again",
                     self.path, age, self.max_age_seconds)
            return None
        log.info("using the read sweep saved %.0f s ago in %s", age, self.path)
        return tuning

    def save(self, tuning: ReadTuning, measured_at: float) -> None:
        body = {"format": SWEEP_FORMAT, "key": self.key, "measured_at": measured_at, "tuning": tuning.to_dict()}
        write_atomically(self.path, json.dumps(body, indent=1))


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


class BackgroundSweep:
    """Runs `measure(gate)` once in a daemon thread, then `on_result(tuning, measured_at)`. Errors are logged:
    loads keep the tier defaults."""

    def __init__(self, measure: Callable[[SweepGate], ReadTuning], gate: SweepGate,
                 on_result: Callable[[ReadTuning, float], None]):
        self.measure, self.gate, self.on_result = measure, gate, on_result
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="read-sweep", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.time()
        try:
            tuning = self.measure(self.gate)
            self.on_result(tuning, started)
            log.info("read sweep done in %.1f s: %s", time.time() - started,
                     ", ".join(sorted(tuning.tiers)) or "no tier could be measured")
        except SweepCancelled as exc:
            log.info("read sweep cancelled: %s", exc)
        except Exception:
            log.exception("read sweep failed: loads keep the tier defaults")
        finally:
            self.done.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
