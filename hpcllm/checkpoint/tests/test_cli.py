"""`hpcllm convert` and `hpcllm checkpoint` through a real subprocess: results on stdout, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hpcllm.checkpoint import read_checkpoint
from hpcllm.checkpoint.tests.conftest import write_checkpoint
from hpcllm.cli.main import main
from hpcllm.store.tests.tmpfs import mounted_tmpfs


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
    (lambda hf: (hf.mkdir(), (hf / "config.json").write_text('{"model_type": "llama"}')), ["has no weights"]),
    (lambda hf: (hf.mkdir(), (hf / "config.json").write_text('{"model_type": "llama"}'),
                 (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")),
     ["model.safetensors", "not a readable safetensors file"]),
    (lambda hf: (hf.mkdir(), (hf / "config.json").write_text('{"model_type": "llama"}'),
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
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_clean_error(hpcllm("convert", hf, tmp_path / "out"), str(hf / "model.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_inspect_of_an_hf_folder_says_to_convert(hf_models):
    assert_clean_error(hpcllm("checkpoint", "inspect", hf_models["llama"]), "hpcllm convert")


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """The real entry point in-process (a subprocess per case would mostly time `import torch`)."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_overwrite_keeps_a_folder_of_the_users(hf_models, tmp_path, capsys):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    assert_clean_error(run_main(capsys, "convert", hf_models["llama"], tmp_path / "precious", "--overwrite"),
                       str(tmp_path / "precious"), "is not a converted checkpoint")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "x"


def test_a_chunk_size_beyond_the_maximum_is_a_usage_error(hf_models, tmp_path, capsys):
    result = run_main(capsys, "convert", hf_models["llama"], tmp_path / "out", "--chunk-size-mib", "99999999999")
    assert result.returncode == 2 and "'--chunk-size-mib': 99999999999 is not in the range 1<=x<=256" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, fragment", [(lambda path: path.write_text("garbage\n"), "does not match"),
                                              (Path.unlink, "cannot be read")])
def test_verify_checks_slice_hashes(hf_models, tmp_path, capsys, damage, fragment):
    out = tmp_path / "out"
    assert run_main(capsys, "convert", hf_models["llama"], out).returncode == 0
    damage(out / "slice-hashes.json")
    assert_clean_error(run_main(capsys, "checkpoint", "verify", out), "slice-hashes.json", fragment,
                       "add-slice-hashes")
    assert run_main(capsys, "checkpoint", "add-slice-hashes", out).returncode == 0
    assert ": ok" in run_main(capsys, "checkpoint", "verify", out).stdout


def test_add_slice_hashes_where_it_cannot_write_is_one_error_line(tmp_path, capsys):
    # A checkpoint on a read-only mount (a shared models folder) or a full disk: the reason, no traceback.
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:
        ckpt = write_checkpoint({"w": torch.ones(64, 32)}, disk / "ckpt")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert_clean_error(run_main(capsys, "checkpoint", "add-slice-hashes", ckpt), str(ckpt),
                           "cannot write slice-hashes.json", "Read-only file system")


def test_verify_of_a_file_says_it_is_not_a_folder(tmp_path, capsys):
    (tmp_path / "model.tar").write_text("x")
    assert_clean_error(run_main(capsys, "checkpoint", "verify", tmp_path / "model.tar"), "is not a folder")


def test_an_unreadable_weight_file_is_reported_as_such(hf_models):
    # safetensors says "No such file or directory" for a file it may not open. Root reads anything: as root (the
    # test sandbox) the conversion runs as nobody (setpriv, as the audit did), in a folder nobody can reach.
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    assert not as_nobody or shutil.which("setpriv"), "setpriv (util-linux) is needed to run this as another user"
    root = Path(tempfile.mkdtemp(prefix="hpcllm-unreadable-"))
    try:
        root.chmod(0o777)
        shutil.copytree(hf_models["llama"], root / "hf")
        (root / "hf" / "model.safetensors").chmod(0)
        result = subprocess.run([*as_nobody, sys.executable, "-m", "hpcllm.cli.main", "convert", root / "hf",
                                 root / "out"], capture_output=True, text=True, timeout=300, cwd=root)
        assert_clean_error(result, str(root / "hf" / "model.safetensors"), "is not readable (Permission denied)")
    finally:
        shutil.rmtree(root)
