"""`hpcllm store load` and `hpcllm store dram`: one JSON stats document; errors as one line, no traceback."""

from __future__ import annotations

import json
import os

from hpcllm.cli.main import main
from hpcllm.store.dram import MARKER_FILE


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



def test_store_dram_list_racing_a_fill_lists_instead_of_crashing(models, dram_tier, capsys, monkeypatch):
    """A fill publishes its folder (renames .tmp-* to the model's name) while `list` sums the tier's bytes, just
    after it found the fill's file: the listing goes on, rather than a FileNotFoundError traceback."""
    _, converted = models("gpt2")
    ns = ["--namespace", dram_tier.namespace]
    assert main(["store", "dram", "put", str(converted), "--id", "g", *ns]) == 0
    staging = dram_tier.staging_path("h")
    staging.mkdir()
    (staging / "data-00000.h5").write_bytes(b"x" * 4096)
    capsys.readouterr()
    real_stat = os.stat

    def stat_while_a_fill_publishes(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(staging / "data-00000.h5"):
            os.rename(staging, dram_tier.path("h"))  # what put does once the fill is complete
        return result

    monkeypatch.setattr(os, "stat", stat_while_a_fill_publishes)
    assert main(["store", "dram", "list", *ns]) == 0
    out = capsys.readouterr().out
    assert "g\t" in out and f"in {dram_tier.dir}" in out


def test_store_dram_list_racing_a_removal_lists_the_others(models, dram_tier, capsys, monkeypatch):
    """`store dram rm` takes a model away just after `list` found its marker: the listing shows the others, rather
    than failing with that model's "not in the DRAM tier"."""
    _, converted = models("gpt2")
    ns = ["--namespace", dram_tier.namespace]
    for model_id in ("g", "h"):
        assert main(["store", "dram", "put", str(converted), "--id", model_id, *ns]) == 0
    capsys.readouterr()
    marker = dram_tier.path("g") / MARKER_FILE
    real_stat = os.stat

    def stat_while_g_is_removed(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(marker):
            os.rename(dram_tier.path("g"), dram_tier.dir / ".rm-g-0123abcd")  # what remove does first
        return result

    monkeypatch.setattr(os, "stat", stat_while_g_is_removed)
    assert main(["store", "dram", "list", *ns]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert "h" in listed and "g" not in listed
