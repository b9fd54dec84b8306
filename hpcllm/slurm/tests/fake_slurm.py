"""Stand-ins for Slurm's commands, for unit tests of the CLI backend that run without a cluster.

`FakeSlurm(tmp_path)` puts sbatch, squeue, sacct, scancel, scontrol and sinfo on a PATH of their own. Each answers
from the first rule whose command and argument text match (`fake.on("squeue", "--json", stdout=...)`) and logs
its call (argv, stdin, environment) so tests can check what the backend ran.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "sinfo")

_RUNNER = """\
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
command = COMMAND  # noqa: F821 (given by the wrapper)
args = sys.argv[1:]
stdin = "" if sys.stdin.isatty() else sys.stdin.read()
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({"command": command, "args": args, "stdin": stdin, "env": dict(os.environ)}) + "\\n")
with open(os.path.join(here, "rules.json")) as f:
    rules = json.load(f)
joined = " ".join(args)
for rule in rules:
    if rule["command"] == command and rule["contains"] in joined:
        if rule.get("linger"):  # a child left in the background, holding our stdout and stderr open
            import subprocess
            child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({rule['linger']})"],
                                     stdin=subprocess.DEVNULL)
            with open(os.path.join(here, "lingering.pids"), "a") as pids:
                pids.write(f"{child.pid}\\n")
        time.sleep(rule.get("sleep", 0))
        encoding = rule.get("encoding", "utf-8")
        sys.stdout.buffer.write(rule.get("stdout", "").encode(encoding))
        sys.stderr.buffer.write(rule.get("stderr", "").encode(encoding))
        sys.exit(rule.get("rc", 0))
sys.stderr.write(f"fake {command}: no rule for {joined!r}\\n")
sys.exit(99)
"""


class FakeSlurm:
    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rules: list[dict] = []
        self._save()
        runner = self.dir / "_fake_runner.py"
        runner.write_text(_RUNNER)
        for command in COMMANDS:
            path = self.dir / command
            path.write_text(f"#!{sys.executable}\nimport runpy\n"
                            f"runpy.run_path({str(runner)!r}, init_globals={{'COMMAND': {command!r}}}, "
                            f"run_name='__main__')\n")
            path.chmod(0o755)

    def on(self, command: str, contains: str = "", *, stdout: str = "", stderr: str = "", rc: int = 0,
           sleep: float = 0.0, encoding: str = "utf-8", linger: float = 0.0) -> FakeSlurm:
        """`encoding`: how the answer's text becomes bytes ("latin-1" for a site's non-UTF-8 output); `linger`: the
        command leaves a child that sleeps this long holding its stdout and stderr (a site wrapper's logger)."""
        self.rules.append({"command": command, "contains": contains, "stdout": stdout, "stderr": stderr, "rc": rc,
                           "sleep": sleep, "encoding": encoding, "linger": linger})
        self._save()
        return self

    def _save(self) -> None:
        (self.dir / "rules.json").write_text(json.dumps(self.rules))

    def calls(self, command: str | None = None) -> list[dict]:
        log = self.dir / "calls.jsonl"
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines() if line]
        return [e for e in entries if command is None or e["command"] == command]

    def lingering(self) -> list[int]:
        """Pids of the children `linger` left (alive or not)."""
        pids = self.dir / "lingering.pids"
        return [int(line) for line in pids.read_text().split()] if pids.exists() else []

    def path_env(self) -> str:
        return f"{self.dir}{os.pathsep}{os.environ.get('PATH', '')}"
