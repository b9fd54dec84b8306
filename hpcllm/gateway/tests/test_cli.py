"""`hpcllm gateway` argument and config errors are one clear line, and the example config stays valid."""

from __future__ import annotations

import socket
from pathlib import Path

from hpcllm.cli.main import main
from hpcllm.config import load_config
from hpcllm.tests.ports import free_port

REPO = Path(__file__).resolve().parents[3]


def test_example_config_is_valid_and_its_static_section_too(tmp_path):
    example = REPO / "conf" / "gateway.toml"
    config = load_config(example)
    assert config.gateway.router == "auto" and config.gateway.api_keys
    # The commented single-node section must parse once uncommented.
    text = example.read_text()
    keys = ("# [gateway.static_models.", "# worker_url =", "# source =", "# max_model_len =", "# engine =")
    uncommented = "\n".join(line[2:] if line.startswith(keys) else line for line in text.splitlines())
    (tmp_path / "static.toml").write_text(uncommented)
    static = load_config(tmp_path / "static.toml").gateway.static_models["tiny-llama"]
    assert static.worker_urls == ["http://127.0.0.1:8123"] and static.max_model_len == 512
    assert static.engine == "vllm"


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    assert main(["gateway", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_busy_port_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "gw.toml"
        config.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[gateway]\nport = {port}\n')
        assert main(["gateway", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_static_model_above_its_context_length_stops_the_start(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
[gateway.static_models.tiny-llama]
worker_url = "http://127.0.0.1:9"
source = "{tiny_model_dir}"
max_model_len = 2048
""")
    assert main(["gateway", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "gateway.static_models.tiny-llama: max_model_len = 2048 is more than the model's context length of 512" \
        in err and "Traceback" not in err


def test_unknown_worker_class_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "gw.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[gateway]\nworker_class = "eventlet"\n')
    assert main(["gateway", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "gateway.worker_class" in err and "'gthread' or 'gevent'" in err and "Traceback" not in err


def test_a_gateway_refused_at_its_checks_never_says_it_serves(tmp_path, capsys):
    """It printed 'hpcllm gateway on http://...' first, then refused to start: an admin reading the terminal (or a
    unit's log) top-down saw a gateway that was serving."""
    config = tmp_path / "gw.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[gateway]\nport = {free_port()}\n')  # no credentials
    assert main(["gateway", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "refusing to start the gateway" in err and "hpcllm gateway on" not in err, err
