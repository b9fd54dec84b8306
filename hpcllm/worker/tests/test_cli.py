import os
import signal
import subprocess
import sys
import time

import pytest

from hpcllm.cli.main import main
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest, TokenLine


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["worker", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model checkpoint") and "does not exist" in err and "Traceback" not in err


def test_cuda_graphs_on_a_cpu_worker_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    config = tmp_path / "worker.toml"
    config.write_text("[worker]\ncuda_graphs = true\nmodel_process = false\n")
    assert main(["worker", "--model", str(tmp_path / "ckpt"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[worker] cuda_graphs needs a GPU worker" in err and "device 'cpu'" in err and "Traceback" not in err


def test_a_config_with_the_secret_that_others_may_read_is_refused(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    config = tmp_path / "worker.toml"
    config.write_text('[cluster]\nshared_secret = "s3cret-s3cret-s3cret"\n')
    config.chmod(0o644)
    assert main(["worker", "--model", str(tmp_path / "ckpt"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"config file {config} holds secrets" in err and f"chmod 600 {config}" in err and "Traceback" not in err


@pytest.mark.parametrize("options, named", [
    (["--stop-signal", "USR2"], "--stop-signal only applies with --tensor-parallel"),
    (["--tensor-parallel", "--engine", "vllm"], "--tensor-parallel runs hpcllm's engine only"),
    (["--tensor-parallel", "--cache-into", "{tmp}"], "--cache-into fills a node cache from a single worker"),
], ids=["stop-signal-alone", "vllm-tensor-parallel", "cache-into-tensor-parallel"])
def test_options_the_mode_would_ignore_are_refused(tmp_path, capsys, options, named):
    (tmp_path / "ckpt").mkdir()
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    assert main(["worker", "--model", str(tmp_path / "ckpt"), *options]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_a_vllm_worker_without_vllm_fails_before_it_listens(tmp_path, capsys):
    """An interpreter without vLLM (this venv) cannot serve: the worker says so at once, without importing torch
    or opening its port first, so the node agent reports the reason in a second rather than after a load."""
    (tmp_path / "ckpt").mkdir()
    assert main(["worker", "--model", str(tmp_path / "ckpt"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: vLLM cannot be imported by {sys.executable}") and "make vllm-venv" in err
    assert "listening on" not in err and "Traceback" not in err


def test_url_file_in_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert main(["worker", "--model", str(tmp_path / "ckpt"), "--url-file", str(tmp_path / "no" / "url")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --url-file {tmp_path / 'no' / 'url'}: its folder") and "Traceback" not in err


def test_a_url_file_that_cannot_be_written_ends_the_worker_with_its_model_process(tmp_path, model_dirs):
    """Serving fails after the model process started (the URL cannot be published: a folder is in its way): one
    error line, and the process exits - the model process (which ignores SIGTERM, waiting for its model) is stopped
    instead of hanging the worker's exit."""
    from hpcllm.checkpoint.converter import convert

    checkpoint = convert(model_dirs["llama"], tmp_path / "tiny-llama").root
    (tmp_path / "url").mkdir()
    env = {**os.environ, "HPCLLM_SHARED_SECRET": "cli-secret"}
    result = subprocess.run(
        [sys.executable, "-m", "hpcllm.cli.main", "worker", "--model", str(checkpoint), "--url-file",
         str(tmp_path / "url")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot write the worker's URL to {tmp_path / 'url'}" in result.stderr
    assert "Traceback" not in result.stderr


def started_cli_worker(tmp_path, model_dirs) -> tuple[subprocess.Popen, WorkerClient]:
    """`hpcllm worker` in a subprocess on the tiny Llama, converted; returned once it is ready (killed if it is not
    within 120 s). Its output (stdout and stderr) is the process's stdout."""
    from hpcllm.checkpoint.converter import convert

    checkpoint = convert(model_dirs["llama"], tmp_path / "tiny-llama").root
    url_file = tmp_path / "worker.url"
    env = {**os.environ, "HPCLLM_SHARED_SECRET": "cli-secret"}
    process = subprocess.Popen(
        [sys.executable, "-m", "hpcllm.cli.main", "worker", "--model", str(checkpoint), "--url-file", str(url_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not url_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert url_file.exists(), process.stdout.read() if process.poll() is not None else "no url file"
        client = WorkerClient(url_file.read_text().strip(), "cli-secret")
        while client.ready() is None and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        assert client.ready() is not None, "the worker was not ready within 120 s"
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process, client


@pytest.mark.slow
def test_worker_process_loads_a_converted_checkpoint_and_serves(tmp_path, model_dirs, load_pair, reference_model):
    process, client = started_cli_worker(tmp_path, model_dirs)
    stopping = False
    try:
        ready = client.ready()
        assert ready["model"] == "tiny-llama"
        model_process = ready["model_process_pid"]  # a CPU worker's default ([worker] model_process = "auto")
        assert model_process and os.path.exists(f"/proc/{model_process}")

        _, tokenizer = load_pair("llama")
        prompt_ids = tokenizer("hello world, this")["input_ids"]
        import torch

        expected = reference_model("llama").generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12)[0, len(prompt_ids):]
        with client.generate(GenerateRequest(request_id="cli", prompt_token_ids=prompt_ids, max_tokens=12,
                                             temperature=0)) as stream:
            got = [line.token_id for line in stream if isinstance(line, TokenLine)]
        assert got == expected.tolist()
        assert 'hpcllm_model_load_seconds{model_name="tiny-llama",tier=' in client.metrics_text()

        # SIGTERM while a generation streams: the stream still ends with a final "abort" line, then exit 0.
        in_flight = client.generate(GenerateRequest(request_id="cut", prompt_token_ids=prompt_ids, ignore_eos=True))
        lines = iter(in_flight)
        next(lines)
        process.send_signal(signal.SIGTERM)
        stopping = True
        assert list(lines)[-1].finish_reason == "abort"
    finally:
        if not stopping:  # one SIGTERM only: a second one after the process restored its handlers would kill it
            process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "listening on http://127.0.0.1:" in output
    assert not os.path.exists(f"/proc/{model_process}")  # the worker stopped its model process


def test_a_folder_that_is_not_a_converted_checkpoint_exits_with_the_loader_error(model_dirs, capsys):
    assert main(["worker", "--model", str(model_dirs["gpt2"])]) != 0
    err = capsys.readouterr().err
    assert "listening on http://127.0.0.1:" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "hpcllm convert" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_worker_whose_engine_dies_ends_its_streams_and_exits_with_the_reason(tmp_path, model_dirs):
    """Its model process killed (the kernel's OOM killer, say), the engine can never serve again: the worker ends the
    stream in flight with an error line and exits non-zero, saying why, so its supervisor (the node agent reports
    the instance failed) starts another, instead of answering 503 for ever while counted as ready."""
    process, client = started_cli_worker(tmp_path, model_dirs)
    try:
        model_process = client.ready()["model_process_pid"]
        with client.generate(GenerateRequest(request_id="doomed", prompt="hello world", ignore_eos=True)) as stream:
            lines = iter(stream)
            next(lines)
            os.kill(model_process, signal.SIGKILL)
            final = list(lines)[-1]
        assert final.finish_reason == "error" and final.error.type == "engine_unavailable"
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, output
    assert "error: the engine died, so the worker stops: ModelProcessError: the model process" in output
