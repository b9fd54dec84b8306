"""Test-only entry point: the real controller service (SQLite, HTTP, autoscaler timer, real HTTP agent client)
with Slurm replaced by a FileBackend, so restart tests can change Slurm's answers while the process is dead.

    python -m hpcllm.controller.tests.controller_proc CONFIG.toml SLURM_STATE.json PORT READY_FILE
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hpcllm.config import load_config
from hpcllm.controller.server import build_service, serve
from hpcllm.controller.tests.doubles import FileBackend


def main(argv: list[str]) -> None:
    config_path, slurm_state, port, ready_file = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(config_path)
    service = build_service(config, backend=FileBackend(slurm_state), config_path=config_path)
    serve(service, config.controller.host, int(port), Path(ready_file))


if __name__ == "__main__":
    main(sys.argv[1:])
