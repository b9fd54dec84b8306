"""A node agent's start: from its process start to registered with the controller, and to its first spare worker
ready (imports done), with the tier probes at start (nothing saved on the node) against the saved tier rates of an
earlier agent on the node (node.probe_max_age_seconds; the probes then run in the background once the node idles).

    PYTHONPATH=$PWD .venv/bin/python bench/agent_start.py [--runs 5] [--probe-mib 128] [--gpus 0]

Each run starts a real agent (`python -m hpcllm.cli.main node`, as a Slurm job does, without Slurm) against a
controller served in this process (its own SQLite database, no Slurm backend), waits until the controller has
registered the node and the agent's spare has printed "spare worker ready", then stops the agent (SIGTERM: its drain)
before the next run. Runs alternate "probes" (the saved tier probes removed first: the start as before) and
"saved" (the file the previous run left). The read sweep is off (node.read_sweep = false) in both: it runs in the
background after registering and is not part of either start. Probes use node.probe_bytes = memcpy_probe_bytes =
--probe-mib (default 128, the service's default probe size); --gpus N gives the agent N GPUs
(CUDA_VISIBLE_DEVICES 0..N-1): the start-up probes then include the host-to-device copy, which initialises CUDA in a
child process. Prints each run, the medians per mode and the probes / saved ratio of the medians, all measured in
this run.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from hpcllm.config import parse_config  # noqa: E402
from hpcllm.controller.protocol import MAX_REQUEST_BYTES  # noqa: E402
from hpcllm.controller.server import build_service  # noqa: E402
from hpcllm.httpkit.server import InternalServer  # noqa: E402

NODE = "bench-agent-start"
SECRET = "bench-agent-start-secret"
SPARE_READY = "spare worker ready"


def write_config(root: Path, probe_bytes: int) -> Path:
    path = root / "hpcllm.toml"
    path.write_text(f"""[paths]
state_dir = "{root / 'state'}"
models_dir = "{root / 'models'}"
[cluster]
shared_secret = "{SECRET}"
[node]
nvme_dir = "{root / 'nvme'}"
nvme_scope = "persistent"
probe_bytes = {probe_bytes}
memcpy_probe_bytes = {probe_bytes}
read_sweep = false
spare_workers = 1
""")
    path.chmod(0o600)  # it holds the cluster secret: the agent refuses a file others may read
    return path


class Controller:
    """The controller's app on the service's own HTTP server; notes when it registered each agent."""

    def __init__(self, root: Path):
        config = parse_config({"cluster": {"shared_secret": SECRET}, "paths": {"state_dir": str(root / "ctl")},
                               "controller": {"database_url": f"sqlite:///{root / 'ctl.db'}"}})
        self.service = build_service(config)
        self.registered_at: list[float] = []
        register = self.service.controller.register

        def noted(reg, *args, **kwargs):
            answer = register(reg, *args, **kwargs)
            self.registered_at.append(time.time())
            return answer

        self.service.controller.register = noted
        self.server = InternalServer(self.service.app, "127.0.0.1", 0, http=config.internal_http, threads=4,
                                     name="controller", max_request_bytes=MAX_REQUEST_BYTES)
        self.server.start()
        self.url = f"{self.server.scheme}://127.0.0.1:{self.server.port}"


def spare_ready(state_dir: Path) -> bool:
    for log in state_dir.glob("node/*/spare-*.log"):
        try:
            if SPARE_READY in log.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def one_start(root: Path, config: Path, controller: Controller, gpus: int, timeout: float = 300.0) -> tuple:
    """(seconds to registered, seconds to the first spare ready) of one agent process, then it is stopped."""
    for old in (root / "state").glob("node/*/spare-*.log"):
        old.unlink()
    env = {**os.environ, "SLURMD_NODENAME": NODE, "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    log_path = root / "agent.log"
    before = len(controller.registered_at)
    started = time.time()
    with open(log_path, "ab") as log:
        agent = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "node", "--config", str(config),
                                  "--controller-url", controller.url, "--port", "0"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    registered = spare = None
    deadline = started + timeout
    try:
        while (registered is None or spare is None) and time.time() < deadline:
            if agent.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise SystemExit(f"the agent exited with status {agent.returncode}:\n{tail}")
            if registered is None and len(controller.registered_at) > before:
                registered = controller.registered_at[before] - started
            if spare is None and spare_ready(root / "state"):
                spare = time.time() - started
            time.sleep(0.01)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    if registered is None or spare is None:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"no registration or no ready spare within {timeout:.0f} s:\n{tail}")
    return registered, spare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each mode")
    parser.add_argument("--probe-mib", type=int, default=128)
    parser.add_argument("--gpus", type=int, default=0)
    args = parser.parse_args()
    require_at_least(parser, args, 1, "runs", "probe_mib")
    require_at_least(parser, args, 0, "gpus")
    with tempfile.TemporaryDirectory(prefix="hpcllm-agent-start-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        config = write_config(root, args.probe_mib << 20)
        controller = Controller(root)
        saved_probes = root / "nvme" / ".hpcllm-tier-probe.json"
        results: dict[str, list[tuple[float, float]]] = {"probes": [], "saved": []}
        one_start(root, config, controller, args.gpus)  # warm-up (imports into the page cache); leaves the file
        for run in range(2 * args.runs):
            mode = ("probes", "saved")[(run + run // 2) % 2]  # probes, saved, saved, probes, ...
            if mode == "probes":
                saved_probes.unlink(missing_ok=True)
            elif not saved_probes.exists():
                raise SystemExit(f"no saved tier probes at {saved_probes}: the previous agent saved none")
            registered, spare = one_start(root, config, controller, args.gpus)
            results[mode].append((registered, spare))
            print(f"run {run + 1:2d} {mode:6s}: registered {registered:6.3f} s, spare ready {spare:6.3f} s",
                  flush=True)
        controller.server.stop()
    medians = {mode: (statistics.median(r for r, _ in rs), statistics.median(s for _, s in rs))
               for mode, rs in results.items()}
    for mode, (registered, spare) in medians.items():
        print(f"median {mode:6s} ({len(results[mode])} runs): registered {registered:6.3f} s, "
              f"spare ready {spare:6.3f} s")
    print(f"probes / saved: registered {medians['probes'][0] / medians['saved'][0]:.2f}x, "
          f"spare ready {medians['probes'][1] / medians['saved'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
