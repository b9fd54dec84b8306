"""`hpcllm batch submit|status|cancel|download` against a real gateway and the tiny model's worker."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import pytest

from hpcllm.cli.main import main
from hpcllm.gateway.batches import cli as batch_cli
from hpcllm.gateway.files import PAGE_MAX
from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import MODEL, USER_KEY
from .test_batches_api import completion_line, finished, gated_factory, jsonl, service_of  # noqa: F401 (a fixture)


def run(capsys, gw, *args: str) -> tuple[int, str, str]:
    code = main(["batch", *args, "--url", gw.url, "--api-key", USER_KEY])
    out, err = capsys.readouterr()
    return code, out, err


class SubmitWaiting:
    """`hpcllm batch submit --wait` of `count` completion lines, run in a thread; started once the batch's first
    request reached the gated worker."""

    def __init__(self, capsys, gw, worker, tmp_path, count: int):
        requests = tmp_path / "requests.jsonl"
        requests.write_bytes(jsonl([completion_line(f"r{i}") for i in range(count)]))
        self._answer: list[tuple[int, str, str]] = []
        self._thread = threading.Thread(target=lambda: self._answer.append(
            run(capsys, gw, "submit", str(requests), "--endpoint", "/v1/completions", "--wait")))
        self._thread.start()
        assert worker.reached.wait(30)

    def result(self) -> tuple[int, str, str]:
        """The command's exit status, stdout and stderr once it returned."""
        self._thread.join(60)
        assert not self._thread.is_alive(), "submit --wait did not return"
        return self._answer[0]


def file_ids(gw) -> list[str]:
    return [uploaded.id for uploaded in gw.client().files.list()]


def test_the_batch_command_imports_neither_flask_nor_torch():
    """`hpcllm batch` is a client: it must start fast on a login node, without the gateway's server stack."""
    check = ("import sys, hpcllm.gateway.batches.cli; "
             "print([name for name in ('flask', 'torch', 'prometheus_client') if name in sys.modules])")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_wrong_endpoint_is_refused_before_anything_is_uploaded(gateway, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line("a")]))
    before = file_ids(gateway)
    code, _, err = run(capsys, gateway, "submit", str(requests), "--endpoint", "/v1/complete")
    assert code == 2 and "'/v1/complete' is not one of '/v1/chat/completions', '/v1/completions'" in err
    assert file_ids(gateway) == before


def test_a_batch_the_gateway_refuses_leaves_no_uploaded_file(gateway, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line("a")]))
    before = file_ids(gateway)
    too_many = [f"--metadata=k{i}=v" for i in range(17)]  # OpenAI's bound is 16 pairs
    code, out, err = run(capsys, gateway, "submit", str(requests), "--endpoint", "/v1/completions", *too_many)
    assert code != 0 and err.startswith("error: the gateway refused (400): 'metadata' may have at most 16 pairs")
    assert out == "" and file_ids(gateway) == before


def test_submit_wait_status_and_download(gateway, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    requests = tmp_path / "requests.jsonl"
    bad = {**completion_line("b"), "body": {"model": MODEL, "prompt": "x", "max_tokens": -1}}
    requests.write_bytes(jsonl([completion_line("a"), bad]))
    code, out, err = run(capsys, gateway, "submit", str(requests), "--endpoint", "/v1/completions", "--wait",
                         "--metadata", "run=1")
    assert code == 0, err
    batch_id = out.splitlines()[0]
    assert out.splitlines()[-1] == "completed: 1 completed, 1 failed of 2"
    assert gateway.client().batches.retrieve(batch_id).metadata == {"run": "1"}

    code, out, _ = run(capsys, gateway, "status")
    assert code == 0 and f"{batch_id} completed: 1 completed, 1 failed of 2" in out.splitlines()
    code, out, _ = run(capsys, gateway, "status", batch_id, "--json")
    assert code == 0 and json.loads(out)["output_file_id"]

    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    same = tmp_path / "all.jsonl"  # the error file would replace the answers
    code, _, err = run(capsys, gateway, "download", batch_id, "--output", str(same), "--errors", str(same))
    assert code == 2 and "--errors" in err and "two files" in err and not same.exists(), err
    code, out, err = run(capsys, gateway, "download", batch_id, "--output", str(output), "--errors", str(errors))
    assert code == 0, err
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == ["a"]
    assert [json.loads(line)["response"]["status_code"] for line in errors.read_text().splitlines()] == [422]
    assert not list(tmp_path.glob(".*.part"))


def test_a_refused_file_and_an_unfinished_batch_are_one_clear_line(gateway, tmp_path, capsys):
    requests = tmp_path / "bad.jsonl"
    requests.write_bytes(b"{oops\n")
    before = file_ids(gateway)
    code, out, err = run(capsys, gateway, "submit", str(requests))  # without --wait: a failed batch's 10 still
    assert code == 10 and "failed: the input file was refused (line 1: invalid_json_line" in err
    assert "Traceback" not in err
    # No batch reads the refused upload: its copy is not left to count against the key's quota (no command lists it).
    assert file_ids(gateway) == before

    code, _, err = run(capsys, gateway, "status", "batch_nope")
    assert code != 0 and err.startswith("error: the gateway refused (404)")
    code, _, err = run(capsys, gateway, "submit", str(requests), "--metadata", "novalue")
    assert code != 0 and "KEY=VALUE" in err


def test_cancel_and_download_before_the_end(gated_factory, tmp_path, capsys):
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line(f"r{i}") for i in range(3)]))
    code, out, _ = run(capsys, gw, "submit", str(requests), "--endpoint", "/v1/completions")
    batch_id = out.splitlines()[0]
    assert worker.reached.wait(30)
    code, _, err = run(capsys, gw, "download", batch_id)
    assert code != 0 and f"batch {batch_id} is in_progress" in err
    code, out, _ = run(capsys, gw, "cancel", batch_id)
    assert code == 0 and out == "cancelling: 0 completed, 0 failed of 3\n"
    worker.release.set()
    assert finished(gw.client(), batch_id).status == "cancelled"
    code, out, _ = run(capsys, gw, "download", batch_id, "--output", str(tmp_path / "out.jsonl"))
    assert code == 0 and out.startswith(f"{tmp_path / 'out.jsonl'} (")  # r0 ran before the cancel


def test_keep_hours_sets_when_the_input_and_the_results_are_deleted(gateway, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line("a")]))
    code, out, err = run(capsys, gateway, "submit", str(requests), "--endpoint", "/v1/completions", "--wait",
                         "--keep-hours", "2")
    assert code == 0, err
    client = gateway.client()
    done = client.batches.retrieve(out.splitlines()[0])
    for file_id in (done.input_file_id, done.output_file_id):
        stored = client.files.retrieve(file_id)
        assert stored.expires_at == stored.created_at + 2 * 3600, stored
    code, _, err = run(capsys, gateway, "submit", str(requests), "--keep-hours", "0")
    assert code == 2 and "--keep-hours" in err  # OpenAI's bounds: an hour to 30 days, refused before any upload


def test_a_download_into_a_folder_that_does_not_exist_is_one_clear_line(gateway, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line("a")]))
    code, out, err = run(capsys, gateway, "submit", str(requests), "--endpoint", "/v1/completions", "--wait")
    assert code == 0, err
    target = tmp_path / "missing" / "out.jsonl"
    code, out, err = run(capsys, gateway, "download", out.splitlines()[0], "--output", str(target))
    assert code == 1 and err == f"error: cannot write {target}: No such file or directory (give a file in a folder " \
                                f"you may write: --output, --errors)\n", err


def test_a_batch_that_failed_while_running_is_not_told_as_a_refused_input_file(gateway, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    runner = service_of(gateway).runner

    def broken(owner: str):
        raise RuntimeError("a bug in the runner")

    monkeypatch.setattr(runner, "api_token", broken)
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line("a")]))
    code, out, err = run(capsys, gateway, "submit", str(requests), "--endpoint", "/v1/completions", "--wait")
    failed = batch_cli.BatchNotCompleted.EXIT_CODES["failed"]
    assert code == failed and f"batch {out.splitlines()[0]} failed: running it failed (batch_run_failed: Running the " \
                              f"batch failed 3 times in a row: RuntimeError: a bug in the runner)" in err, err


def test_status_lists_every_batch_of_the_key_not_only_the_first_page(gateway, capsys):
    client = gateway.client()
    empty = client.files.create(file=("empty.jsonl", io.BytesIO(b"")), purpose="batch")
    made = [client.batches.create(input_file_id=empty.id, endpoint="/v1/completions", completion_window="24h").id
            for _ in range(PAGE_MAX + 1)]  # one more than a page; each fails at once: cheap
    code, out, err = run(capsys, gateway, "status")
    listed = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and set(made) <= set(listed) and len(listed) == len(set(listed)), err


def test_status_lists_the_batches_though_one_a_page_ended_on_is_swept_before_the_next(gateway, capsys, monkeypatch):
    """The sweep deletes an ended batch with its expired files, maybe the one a page of the list ended on, before the
    next page is asked for after it: status still lists the key's batches (read again from the start)."""
    client = gateway.client()
    empty = client.files.create(file=("empty.jsonl", io.BytesIO(b"")), purpose="batch")
    made = [client.batches.create(input_file_id=empty.id, endpoint="/v1/completions", completion_window="24h").id
            for _ in range(3)]  # each fails at once
    monkeypatch.setattr(batch_cli, "PAGE_MAX", 2)
    json_call, swept = batch_cli.BatchClient.json, []

    def swept_after_the_first_page(self, method, path, **kwargs):
        answer = json_call(self, method, path, **kwargs)
        if path == "/v1/batches" and not swept:
            swept.append(answer["data"][-1]["id"])
            with service_of(gateway).batches.shared.transaction() as db:
                db.conn.execute("DELETE FROM gateway_batches WHERE id = ?", (swept[0],))
        return answer

    monkeypatch.setattr(batch_cli.BatchClient, "json", swept_after_the_first_page)
    code, out, err = run(capsys, gateway, "status")
    listed = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and swept == [made[1]], err
    assert set(made) - set(listed) == {made[1]} and len(listed) == len(set(listed)), out


def test_a_download_the_gateway_cuts_off_is_one_clear_line_and_leaves_no_file(tmp_path, capsys):
    """The gateway closes the connection mid-file (it restarts, a proxy times out): one error line, a non-zero exit,
    and no output file that would look complete."""
    done = {"id": "batch_cut", "object": "batch", "status": "completed", "output_file_id": "file-cut-output",
            "request_counts": {"total": 20, "completed": 20, "failed": 0}}

    def cut_gateway(environ, start_response):
        if environ["PATH_INFO"] == "/v1/batches/batch_cut":
            body = json.dumps(done).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", "100000")])

        def cut_off():
            yield jsonl([completion_line(f"r{i}") for i in range(10)])
            raise ConnectionResetError("the gateway went away")

        return cut_off()

    server = ThreadServer(cut_gateway)
    try:
        target = tmp_path / "out.jsonl"
        code = main(["batch", "download", "batch_cut", "--output", str(target), "--url", server.url,
                     "--api-key", USER_KEY])
    finally:
        server.stop()
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "file-cut-output" in err and "download" in err, err
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("ending", ["cancelled", "expired"])
def test_submit_wait_exits_non_zero_unless_the_batch_completed(gated_factory, tmp_path, capsys, monkeypatch, ending):
    """Scripts chain on `submit --wait`: a batch that ends cancelled or expired (or failed) is not a success, and each
    ending has its own exit status."""
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    waiting = SubmitWaiting(capsys, gw, worker, tmp_path, 3)
    service = service_of(gw)
    (batch_id,) = service.runner.running
    if ending == "cancelled":
        gw.client().batches.cancel(batch_id)
    else:  # its 24 h are over
        service.batches.renew(service.runner.running[batch_id], expires_at=int(time.time()) - 1)
    service.runner.wake()
    worker.release.set()
    code, out, err = waiting.result()
    assert code == batch_cli.BatchNotCompleted.EXIT_CODES[ending] and len(set(
        batch_cli.BatchNotCompleted.EXIT_CODES.values()) | {0, 1, 2}) == 6, (code, err)
    assert out.splitlines()[-1].startswith(f"{ending}: 1 completed") and err.startswith(
        f"error: batch {batch_id} ended {ending}: 1 completed"), (out, err)


def test_submit_wait_is_answered_while_the_batch_keeps_the_keys_request_budget_empty(gated_factory, tmp_path, capsys,
                                                                                     monkeypatch):
    """A batch runs as fast as its key's rate limit allows, so it keeps the key's request bucket empty; --wait's
    polls read the batch, which takes nothing from that bucket (it counts model requests only): they are answered,
    none refused 429, and the command ends with the batch. (A 429 from elsewhere, a proxy, is polled again after its
    Retry-After: test_submit_wait_polls_again_when_the_gateways_retry_after_says.)"""
    from .test_batches_api import _bucket_id, metric, wait_until

    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1, api_keys=[{"key": USER_KEY, "name": "alice", "requests_per_minute": 60}])
    waiting = SubmitWaiting(capsys, gw, worker, tmp_path, 2)
    bucket, limit = _bucket_id(gw.state.api_keys[USER_KEY], "requests"), {"capacity": 60, "per_second": 1.0}
    # Taken whole and 1 more, as of an hour from now: empty (not refilled) until the test refills it.
    gw.state.shared.take(bucket, **limit, cost=61, now=time.time() + 3600)
    def polls_answered() -> float:
        return metric(gw, "hpcllm_http_requests_total", endpoint="/v1/batches/<batch_id>", status="200")

    before = polls_answered()
    wait_until(lambda: polls_answered() >= before + 3)  # answered while the bucket is empty
    gw.state.shared.refund(bucket, **limit, amount=61, now=time.time())  # the batch's own lines go on
    worker.release.set()
    code, out, err = waiting.result()
    assert code == 0, (out, err)
    assert out.splitlines()[-1] == "completed: 2 completed, 0 failed of 2", out
    assert not metric(gw, "hpcllm_http_requests_total", endpoint="/v1/batches/<batch_id>", status="429"), err
    assert "429" not in err, err


def test_submit_wait_gives_up_on_a_gateway_gone_for_good_naming_the_batch(gated_factory, tmp_path, capsys,
                                                                           monkeypatch):
    """A gateway that stops answering while --wait polls (stopped for good, not restarting) ends the command after
    GONE_GIVE_UP_S, exit 1, naming the batch and how to check on it: an sbatch script is not left polling until its
    walltime ends."""
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    monkeypatch.setattr(batch_cli, "GONE_GIVE_UP_S", 0.5)
    worker, factory = gated_factory(blocked=0)
    gw = factory(batch_concurrency=1)
    waiting = SubmitWaiting(capsys, gw, worker, tmp_path, 2)
    (batch_id,) = service_of(gw).runner.running
    factory.running[-1][0].stop()  # the gateway's HTTP server: gone, its batch still running inside
    code, out, err = waiting.result()
    assert code == 1, (out, err)
    assert err.splitlines()[-1].startswith(f"error: gave up waiting for batch {batch_id}: no answer from the "
                                           f"gateway for "), err
    assert err.splitlines()[-1].endswith(f"the batch may still run: hpcllm batch status {batch_id} checks it"), err
    # The URL worked (the batch was made there): the gateway is gone, not mistyped.
    assert "cannot reach the gateway at" in err and "set --url" not in err, err


def test_submit_wait_polls_again_when_the_gateways_retry_after_says(tmp_path, capsys, monkeypatch):
    """A poll refused with a Retry-After (the key's rate limit, a gateway draining) is asked again no sooner than
    it says, and no later than RETRY_AFTER_MAX_S (a proxy's may be hours)."""
    monkeypatch.setattr(batch_cli, "POLL_S", 0.05)
    slept = []
    monkeypatch.setattr(batch_cli, "time", type("Clock", (), {"sleep": staticmethod(slept.append),
                                                              "monotonic": staticmethod(time.monotonic)}))
    running = {"id": "batch_r", "object": "batch", "status": "in_progress",
               "request_counts": {"total": 1, "completed": 0, "failed": 0}}
    polls = [(429, {"Retry-After": "7"}, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}),
             (503, {"Retry-After": "86400"}, {"error": {"message": "draining", "code": "draining"}}),
             (200, {}, {**running, "status": "completed", "request_counts": {"total": 1, "completed": 1, "failed": 0}})]

    def gateway(environ, start_response):
        if environ["PATH_INFO"] == "/v1/files":
            status, headers, answer = 200, {}, {"id": "file-r", "object": "file"}
        elif environ["REQUEST_METHOD"] == "POST":
            status, headers, answer = 200, {}, running
        else:
            status, headers, answer = polls.pop(0)
        body = json.dumps(answer).encode()
        start_response(f"{status} X", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                       *headers.items()])
        return [body]

    server = ThreadServer(gateway)
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([completion_line("r0")]))
    try:
        code = main(["batch", "submit", str(requests), "--endpoint", "/v1/completions", "--wait", "--url", server.url,
                     "--api-key", USER_KEY])
    finally:
        server.stop()
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines()[-1] == "completed: 1 completed, 0 failed of 1", (out, err)
    assert slept == [0.05, 7.0, batch_cli.RETRY_AFTER_MAX_S], slept


def test_download_saves_what_a_batch_that_failed_while_running_finished(tmp_path, capsys):
    """A batch that failed while running keeps the results it made (its output_file_id): download saves them, then
    says it failed (the exit status of a failed batch)."""
    lines = jsonl([completion_line("r0")])
    failed = {"id": "batch_f", "object": "batch", "status": "failed", "in_progress_at": 1, "failed_at": 2,
              "output_file_id": "file-f-output", "request_counts": {"total": 3, "completed": 1, "failed": 0},
              "errors": {"object": "list", "data": [{"code": "input_file_missing", "message": "gone", "line": None}]}}

    def gateway_of_a_failed_batch(environ, start_response):
        body = json.dumps(failed).encode() if environ["PATH_INFO"] == "/v1/batches/batch_f" else lines
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server = ThreadServer(gateway_of_a_failed_batch)
    try:
        target = tmp_path / "out.jsonl"
        code = main(["batch", "download", "batch_f", "--output", str(target), "--url", server.url,
                     "--api-key", USER_KEY])
    finally:
        server.stop()
    out, err = capsys.readouterr()
    assert code == batch_cli.BatchNotCompleted.EXIT_CODES["failed"] and target.read_bytes() == lines, (out, err)
    assert out == f"{target} ({len(lines)} bytes)\n" and err.startswith(
        "error: batch batch_f failed: running it failed (input_file_missing: gone)"), (out, err)
