"""A stand-in for `hpcllm worker` in the node agent's migration tests: the source side of the live-migration contract
(docs: /work/notes/migration-contract.md) without a model, so agent tests run in a second.

    python -m hpcllm.node.tests.fake_worker --url-file F --record R --requests r1,r2
        [--mode ok|refuse|partial|slow|deadline]
        [--ignore-sigterm] [--child]

It binds 127.0.0.1:0, writes its URL to F (as the real worker does), answers /health and /ready (running_requests =
the requests it still holds), and POST /v1/internal/migrate (secret checked) as the contract says:
- ok: every request moves -> {"migrated": [MigrationResult...], "failed": []};
- partial: the first moves, the others fail (they stay here);
- refuse: 502 with the destination's reason, nothing moves;
- slow: sleeps --slow-seconds before answering like ok;
- deadline: answers like ok a tenth of a second past the order's timeout_seconds (its moves took all of it: the
  real worker answers within drain_answer_margin of it).
Every call and SIGTERM are appended to R as JSON lines ({"event", "t", ...}) so tests can check the order of events.

Health (the node agent's watch of ready workers): POST /fake/ready {"answer": 503 | "hang", "count": N} makes the
next N /ready calls (every one when count is null) answer 503 as a worker whose engine died does, or never answer
(a hung server); each /ready after it is recorded ("ready", with the answer). SIGUSR2 (a tensor-parallel
instance's stop signal, the fake standing in for mpirun) is taken as SIGTERM and recorded as "sigusr2".
--ignore-sigterm: SIGTERM and SIGUSR2 are recorded and ignored (a hung worker only SIGKILL ends). --child: it
starts a child process that ignores SIGTERM (a hung engine process, or a tensor-parallel rank under mpirun) and
records its pid ("child", pid).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from flask import Flask, request
from werkzeug.serving import make_server

from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.worker.cli import SECRET_ENV
from hpcllm.worker.protocol import MigrateAllResult, MigrateRequest, MigrationFailure, MigrationResult


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url-file", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--requests", default="")
    parser.add_argument("--mode", choices=("ok", "partial", "refuse", "slow", "deadline"), default="ok")
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--child", action="store_true")
    args, _ = parser.parse_known_args(argv)
    secret = os.environ.get(SECRET_ENV, "")
    running = [r for r in args.requests.split(",") if r]
    lock = threading.Lock()
    sick = {"answer": None, "count": None}  # what /ready answers instead of ready, how many more times
    never = threading.Event()

    def record(event: str, **fields) -> None:
        with lock, open(args.record, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")

    app = Flask("fake-worker")

    @app.before_request
    def check_secret():
        if request.path.startswith("/v1/internal/") and not hmac.compare_digest(
                request.headers.get(SECRET_HEADER, "").encode(), secret.encode()):
            return {"error": {"message": "wrong secret", "type": "authentication_error"}}, 401

    @app.get("/health")
    def health():
        return {"status": "ok", "state": "ready"}

    @app.post("/fake/ready")
    def make_sick():
        body = request.get_json()
        with lock:
            sick.update(answer=body["answer"], count=body.get("count"))
        return {}

    @app.get("/ready")
    def ready():
        with lock:
            answer = sick["answer"]
            if sick["count"] is not None:
                sick["count"] -= 1
                if sick["count"] < 0:
                    answer = None
        if sick["answer"] is not None:
            record("ready", answer=answer or 200)
        if answer == "hang":
            never.wait()
        if answer == 503:
            return {"error": {"message": "not ready: engine died: step timed out", "type": "server_error",
                              "code": "engine_unavailable"}}, 503
        return {"status": "ready", "running_requests": len(running), "waiting_requests": 0, "load_seconds": 0.01,
                "load_tier": "sharedfs"}

    @app.post("/v1/internal/migrate")
    def migrate():
        body = MigrateRequest.model_validate(request.get_json())
        destination = body.destination_url
        record("migrate", destination_url=destination, requests=list(running), timeout_seconds=body.timeout_seconds,
               ticket_destination=body.ticket.destination_url if body.ticket else None)
        if args.mode == "refuse":
            return {"error": {"message": f"destination {destination} refused: model not loaded",
                              "type": "server_error", "code": "destination_refused"}}, 502
        if args.mode == "slow":
            time.sleep(args.slow_seconds)
        if args.mode == "deadline":
            time.sleep(body.timeout_seconds + 0.1)
        moving = running[:1] if args.mode == "partial" else list(running)
        migrated = [MigrationResult(request_id=r, destination_url=destination, destination_request_id=r, rounds=2,
                                    tokens_per_round=[12, 1], handover_seconds=0.01, total_seconds=0.05,
                                    output_tokens_at_handover=13) for r in moving]
        failed = [MigrationFailure(request_id=r, error="destination full") for r in running if r not in moving]
        running[:] = [r for r in running if r not in moving]
        return MigrateAllResult(migrated=migrated, failed=failed).model_dump()

    server = make_server("127.0.0.1", 0, app, threaded=True)

    def on_sigterm(signum, frame):
        record(signal.Signals(signum).name.lower(), requests=list(running))
        if not args.ignore_sigterm:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGUSR2, on_sigterm)  # as "mpirun", which forwards it to its ranks and exits with their 0
    if args.child:
        hung = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); time.sleep(3600)"])
        record("child", pid=hung.pid)
    tmp = args.url_file.with_name(args.url_file.name + ".tmp")
    tmp.write_text(f"http://127.0.0.1:{server.server_port}\n")
    tmp.replace(args.url_file)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
