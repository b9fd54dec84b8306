"""`hpcllm convert` and `hpcllm checkpoint` through a real subprocess: results on stdout, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.checkpoint import read_checkpoint
from hpcllm.cli.main import main


def hpcllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcllm.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


def test_convert_inspect_verify(hf_models, tmp_path, capsys):
    out = tmp_path / "out"
    result = hpcllm("convert", hf_models["gpt2"], out, "--partitions", "2", "--dtype", "bfloat16", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "1 aliases" in result.stdout and "2 partition(s)" in result.stdout
    ckpt = read_checkpoint(out)
    assert {e.dtype for e in ckpt.tensors.values()} == {"bfloat16"}

    result = hpcllm("checkpoint", "inspect", out)
    assert result.returncode == 0 and "alias lm_head.weight -> transformer.wte.weight" in result.stdout
    result = hpcllm("checkpoint", "verify", out)
    assert result.returncode == 0 and ": ok" in result.stdout

    data = ckpt.partitions[0].path
    content = bytearray(data.read_bytes())
    content[-1] ^= 0xFF
    data.write_bytes(content)
    assert_clean_error(hpcllm("checkpoint", "verify", out), data.name, "corrupt")

    code = main(["convert", str(hf_models["gpt2"]), str(out)])
    captured = capsys.readouterr()
    assert_clean_error(subprocess.CompletedProcess([], code, captured.out, captured.err), "already exists",
                       "--overwrite")


@pytest.mark.parametrize("setup, fragments", [
    (lambda hf: None, ["no such folder"]),
    (lambda hf: (hf.mkdir(), (hf / "config.json").write_text("{}")), ["has no weights"]),
    (lambda hf: (hf.mkdir(), (hf / "config.json").write_text("{}"),
                 (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")),
     ["model.safetensors", "not a readable safetensors file"]),
    (lambda hf: (hf.mkdir(), (hf / "config.json").write_text("{}"),
                 (hf / "pytorch_model.bin").write_bytes(b"garbage")),
     ["pytorch_model.bin", "cannot be loaded"]),
])
def test_bad_input_gives_one_error_line(tmp_path, capsys, setup, fragments):
    # In-process through the real entry point (a subprocess per case would mostly time `import torch`).
    hf = tmp_path / "hf"
    setup(hf)
    code = main(["convert", str(hf), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert_clean_error(subprocess.CompletedProcess([], code, captured.out, captured.err), str(hf), *fragments)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["hf"])


def test_subprocess_error_for_a_corrupt_source_has_no_traceback(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_clean_error(hpcllm("convert", hf, tmp_path / "out"), str(hf / "model.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_inspect_of_an_hf_folder_says_to_convert(hf_models):
    assert_clean_error(hpcllm("checkpoint", "inspect", hf_models["llama"]), "hpcllm convert")
