"""`hpcllm store load` and `hpcllm store dram`: one JSON stats document; errors as one line, no traceback."""

from __future__ import annotations

import json

from hpcllm.cli.main import main


def test_store_load_prints_stats_and_generates(models, capsys):
    _, converted = models("llama")
    assert main(["store", "load", str(converted), "--tier", "sharedfs", "--prompt", "the quick brown"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tier"] == "sharedfs" and out["reader_mode"] == "buffered" and out["gbps"] > 0
    assert isinstance(out["generated"], str) and out["generated"]


def test_store_load_of_an_hf_folder_is_one_clear_line(models, capsys):
    hf, _ = models("llama")
    assert main(["store", "load", str(hf)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hpcllm convert" in err and "Traceback" not in err


def test_a_cuda_device_the_machine_lacks_is_one_clear_line(models, capsys):
    import torch

    _, converted = models("llama")
    # On a GPU machine: a GPU it does not have.
    device, words = ("cuda:99", "only") if torch.cuda.is_available() else ("cuda", "CUDA is not available")
    assert main(["store", "load", str(converted), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: device {device if ':' in device else 'cuda:0'} requested but") and words in err
    assert "Traceback" not in err


def test_a_side_file_that_cannot_be_read_is_one_clear_line(models):
    # Root reads anything: as root (the test sandbox) the load runs as nobody (setpriv), in a folder nobody reaches.
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    assert not as_nobody or shutil.which("setpriv"), "setpriv (util-linux) is needed to run this as another user"
    _, converted = models("llama")
    root = Path(tempfile.mkdtemp(prefix="hpcllm-unreadable-"))
    try:
        root.chmod(0o755)
        copy = shutil.copytree(converted, root / "copy")
        for path in (copy, *copy.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (copy / "config.json").chmod(0)
        result = subprocess.run([*as_nobody, sys.executable, "-m", "hpcllm.cli.main", "store", "load", str(copy)],
                                capture_output=True, text=True, timeout=300, cwd=root)
        assert result.returncode == 3, result.stderr  # a checkpoint error's status
        assert result.stderr.startswith(f"error: {copy / 'config.json'}: cannot be read (Permission denied)")
        assert "Traceback" not in result.stderr
    finally:
        shutil.rmtree(root)


def test_store_dram_put_list_rm(models, dram_tier, capsys):
    _, converted = models("gpt2")
    ns = ["--namespace", dram_tier.namespace]
    assert main(["store", "dram", "put", str(converted), "--id", "g", *ns]) == 0
    assert main(["store", "dram", "list", *ns]) == 0
    assert "g\t" in capsys.readouterr().out
    assert main(["store", "dram", "rm", "g", *ns]) == 0
    assert main(["store", "dram", "rm", "g", *ns]) == 1
    assert "not in the DRAM tier" in capsys.readouterr().err
