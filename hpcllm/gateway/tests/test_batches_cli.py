"""`hpcllm batch submit|status|cancel|download` against a real gateway and the tiny model's worker."""

from __future__ import annotations

import json

from hpcllm.cli.main import main
from hpcllm.gateway.batches import cli as batch_cli

from .conftest import MODEL, USER_KEY
from .test_batches_api import completion_line, finished, gated_factory, jsonl  # noqa: F401 (a fixture)


def run(capsys, gw, *args: str) -> tuple[int, str, str]:
    code = main(["batch", *args, "--url", gw.url, "--api-key", USER_KEY])
    out, err = capsys.readouterr()
    return code, out, err


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
    code, out, err = run(capsys, gateway, "download", batch_id, "--output", str(output), "--errors", str(errors))
    assert code == 0, err
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == ["a"]
    assert [json.loads(line)["response"]["status_code"] for line in errors.read_text().splitlines()] == [422]
    assert not list(tmp_path.glob(".*.part"))


def test_a_refused_file_and_an_unfinished_batch_are_one_clear_line(gateway, tmp_path, capsys):
    requests = tmp_path / "bad.jsonl"
    requests.write_bytes(b"{oops\n")
    code, out, err = run(capsys, gateway, "submit", str(requests))
    assert code != 0 and "failed: the input file was refused (line 1: invalid_json_line" in err
    assert "Traceback" not in err

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
