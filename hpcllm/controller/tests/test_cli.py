"""`hpcllm deploy / undeploy / status / controller`: local validation errors, and a real controller process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcllm.cli.main import main
from hpcllm.controller.cli import read_model_file
from hpcllm.controller.errors import InvalidModelConfig
from hpcllm.controller.tests.conftest import ADMIN_KEY, SECRET
from hpcllm.httpkit.tests.thread_server import CannedServer
from hpcllm.controller.tests.test_restart import free_port

REPO = Path(__file__).resolve().parents[3]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)  # services refuse config files with secrets that others can read
    return path


@pytest.mark.parametrize("example", sorted((REPO / "conf" / "models").glob("*.toml")), ids=lambda p: p.name)
def test_example_model_configs_are_valid(example):
    spec = read_model_file(example)
    assert spec.name == example.stem


@pytest.mark.parametrize("text, words", [
    ('name = "m"\nsource = "/x"\ncolour = "red"\n', "colour: Extra inputs are not permitted"),
    ('name = "m"\n', "source: Field required"),
    ('name = "m"\nsource = "/x"\ngpus = -1\n', "gpus: Input should be greater than or equal to 0"),
    ('name = "m"\nsource = "/x"\n[slurm]\npartion = "gpu"\n', "slurm.partion: Extra inputs"),
    ('name = "m"\nsource = "/x"\nmin_instances = 2\nmax_instances = 1\n', "must not exceed max_instances"),
    ('name = "m"\nsource = [\n', "is not valid TOML"),
    ('name = "m"\nsource = "/x"\nkeep_alive_seconds = inf\n', "keep_alive_seconds: Input should be a finite number"),
    ('name = "m"\nsource = "/x"\ntool_call_parser = "qwen3"\n',
     "tool_call_parser: Input should be 'hermes', 'llama3_json', 'qwen3_coder', 'pythonic' or 'mistral'"),
])
def test_deploy_validates_the_file_before_calling_the_controller(tmp_path, capsys, text, words):
    path = write(tmp_path / "m.toml", text)
    # The URL points nowhere: validation must fail first, with the file and the field named.
    assert main(["deploy", str(path), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    with pytest.raises(InvalidModelConfig):
        read_model_file(path)


def test_deploy_of_a_missing_file(tmp_path, capsys):
    assert main(["deploy", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "is not UTF-8 text"),
], ids=["folder", "not-utf8"])
def test_deploy_of_a_model_file_that_is_no_text_file(tmp_path, capsys, make, words):
    path = tmp_path / "m.toml"
    make(path)
    assert main(["deploy", str(path), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model config {path} {words}") and "Traceback" not in err


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "-1"]])
def test_controller_refuses_a_port_out_of_range(tmp_path, capsys, args):
    assert main(["controller", *args]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--port'" in err and "Traceback" not in err


def test_a_ready_file_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path):
    from hpcllm.controller.server import _write_ready_file
    from hpcllm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cannot write the ready file .*/nowhere/ready \(No such file"):
        _write_ready_file(tmp_path / "nowhere" / "ready", "http://127.0.0.1:1")


@pytest.mark.parametrize("url", ["abc", "127.0.0.1:8700", "", "http://:80", "http://127.0.0.1:99999"])
def test_a_malformed_controller_url_is_named_as_such(capsys, url):
    assert main(["status", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"the controller URL (--url or $HPCLLM_CONTROLLER_URL) {url!r} is not a URL like http://HOST:PORT" in err


@pytest.fixture
def not_a_controller():
    """An HTTP server that is not the controller: answers every request with its `answer` (content type, body)."""
    server = CannedServer(("text/html", b"<html>hello</html>"))
    yield server
    server.stop()


@pytest.mark.parametrize("answer, words", [(("text/html", b"<html>hello</html>"), "not JSON: '<html>hello</html>'"),
                                           (("application/json", b"{}"), "now: Field required")],
                         ids=["html", "empty-object"])
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["cache", "ls"]])
def test_a_url_that_leads_elsewhere_is_not_taken_for_the_controller(capsys, not_a_controller, answer, words,
                                                                      command):
    url = not_a_controller.url
    not_a_controller.answer = answer
    assert main([*command, "--url", url]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {url} did not answer like an hpcllm controller (") and words in captured.err
    assert "Traceback" not in captured.err and "no cached copies" not in captured.out


def test_an_answer_from_a_newer_controller_with_fields_this_cli_does_not_know_is_taken(capsys, not_a_controller):
    import json

    url = not_a_controller.url
    status = {"now": 1.0, "models": [], "nodes": [], "instances": [], "allocations": [], "cold_starts": [],
              "field_of_a_newer_version": 1}
    not_a_controller.answer = ("application/json", json.dumps(status).encode())
    assert main(["status", "--json", "--url", url]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["field_of_a_newer_version"] == 1


@pytest.mark.parametrize("existing", [True, False], ids=["existing-file", "missing-folder"])
def test_pool_token_output_is_checked_before_a_token_is_issued(tmp_path, capsys, monkeypatch, existing):
    from hpcllm.controller import cli

    issued = []
    monkeypatch.setattr(cli.AdminClient, "call", lambda self, *args, **kwargs: issued.append(args))
    output = tmp_path / "tok" if existing else tmp_path / "nowhere" / "tok"
    if existing:
        output.write_text("keep me\n")
    assert main(["pool", "token", "issue", "--model", "m", "--group", "g", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for --output" in err and "no token was issued" in err and issued == []
    assert (output.read_text() == "keep me\n") if existing else not output.parent.exists()


def test_pool_token_output_is_removed_when_the_token_is_not_issued(tmp_path, capsys):
    output = tmp_path / "tok"
    assert main(["pool", "token", "issue", "--model", "m", "--group", "g", "--output", str(output),
                 "--url", "http://127.0.0.1:9"]) == 3
    assert "cannot reach the controller" in capsys.readouterr().err and not output.exists()


def test_unreachable_controller_is_one_clear_line(tmp_path, capsys):
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 3
    err = capsys.readouterr().err
    assert "cannot reach the controller at http://127.0.0.1:9" in err and "Traceback" not in err


@pytest.fixture
def running_controller(tmp_path):
    """`hpcllm controller` as users start it (real CLI, real Slurm backend object, no allocations)."""
    port = free_port()
    config = write(tmp_path / "hpcllm.toml", f"""
[paths]
state_dir = "{tmp_path / 'state'}"
[cluster]
shared_secret = "{SECRET}"
[controller]
admin_key = "{ADMIN_KEY}"
port = {port}
allocate_on_demand = false
""")
    ready = tmp_path / "ready"
    log = open(tmp_path / "controller.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "controller", "--config", str(config),
                             "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
        time.sleep(0.05)
    yield config, ready.read_text().strip()
    proc.terminate()
    proc.wait(timeout=15)
    assert (tmp_path / "state" / "controller.db").exists()  # the default database location


def test_deploy_status_undeploy_against_a_running_controller(tmp_path, capsys, running_controller):
    config, url = running_controller
    source = tmp_path / "models" / "tiny"
    source.mkdir(parents=True)
    write(source / "config.json", '{"model_type": "llama", "max_position_embeddings": 512}')
    model = write(tmp_path / "tiny.toml", f'name = "tiny"\nsource = "{source}"\nsize_bytes = 3145728\n')
    assert main(["deploy", str(model), "--config", str(config), "--url", url]) == 0
    out = capsys.readouterr().out
    assert "deployed tiny" in out and "3.0 MiB" in out

    assert main(["status", "--config", str(config), "--url", url]) == 0
    out = capsys.readouterr().out
    assert "models" in out and "tiny" in out and "3.0 MiB" in out

    # Server-side checks come back as one line: the source folder does not exist.
    missing = write(tmp_path / "missing.toml", f'name = "gone"\nsource = "{tmp_path / "nowhere"}"\nsize_bytes = 1\n')
    assert main(["deploy", str(missing), "--config", str(config), "--url", url]) == 1
    assert "source: checkpoint folder" in capsys.readouterr().err

    # A wrong admin key is refused.
    wrong = write(tmp_path / "wrong.toml", f'[controller]\nadmin_key = "nope"\n[cluster]\nshared_secret = "{SECRET}"\n')
    assert main(["status", "--config", str(wrong), "--url", url]) == 1
    assert "401" in capsys.readouterr().err

    assert main(["undeploy", "tiny", "--config", str(config), "--url", url]) == 0
    assert "undeployed tiny (0 instances stopped)" in capsys.readouterr().out
    assert main(["undeploy", "tiny", "--config", str(config), "--url", url]) == 1
    assert "not deployed" in capsys.readouterr().err


def test_deploy_takes_the_models_context_length_and_refuses_a_larger_one(tmp_path, capsys, running_controller):
    from transformers import LlamaConfig

    config, url = running_controller
    source = tmp_path / "models" / "tiny-llama"
    LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                vocab_size=384).save_pretrained(source)

    def deploy(extra: str) -> int:
        model = write(tmp_path / "tiny-llama.toml",
                      f'name = "tiny-llama"\nsource = "{source}"\nsize_bytes = 1048576\n{extra}')
        return main(["deploy", str(model), "--config", str(config), "--url", url])

    # The demo config's old mistake: more than the model's 512 positions. Refused, both numbers named, exit 1.
    assert deploy("max_model_len = 2048\n") == 1
    err = capsys.readouterr().err
    assert "max_model_len = 2048" in err and "context length of 512 tokens" in err
    assert "max_position_embeddings=512" in err and "Traceback" not in err
    assert main(["status", "--config", str(config), "--url", url]) == 0
    assert "tiny-llama" not in capsys.readouterr().out  # nothing was deployed

    # Without the key it takes the model's; a smaller one is kept as asked.
    assert deploy("") == 0
    assert "context 512 tokens" in capsys.readouterr().out
    assert main(["status", "--config", str(config), "--url", url]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if "tiny-llama" in line]
    assert "512" in row.split()
    assert deploy("max_model_len = 256\n") == 0
    assert "context 256 tokens" in capsys.readouterr().out

    # A source without config.json is refused rather than served with a guessed length.
    (source / "config.json").unlink()
    assert deploy("") == 1
    err = capsys.readouterr().err
    assert f"source: {source} has no config.json" in err and "Traceback" not in err
