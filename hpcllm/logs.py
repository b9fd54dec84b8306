"""How hpcllm's long-running processes (controller, node agent, workers) log: one format for all of them, and no
line per internal HTTP call."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# httpx logs every request it sends at INFO. An agent polls each worker's /ready every second and beats to the
# controller every few seconds: those lines were most of an agent's log (400 of 430 lines in its first ten minutes),
# burying what happened. Their failures still reach the log through hpcllm's own messages.
QUIET_LIBRARIES = ("httpx", "httpcore")


def setup_service_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
