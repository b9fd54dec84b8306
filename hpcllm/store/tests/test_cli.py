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


def test_store_dram_put_list_rm(models, dram_tier, capsys):
    _, converted = models("gpt2")
    ns = ["--namespace", dram_tier.namespace]
    assert main(["store", "dram", "put", str(converted), "--id", "g", *ns]) == 0
    assert main(["store", "dram", "list", *ns]) == 0
    assert "g\t" in capsys.readouterr().out
    assert main(["store", "dram", "rm", "g", *ns]) == 0
    assert main(["store", "dram", "rm", "g", *ns]) == 1
    assert "not in the DRAM tier" in capsys.readouterr().err
