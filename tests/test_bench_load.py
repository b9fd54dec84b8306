"""bench/load.py's report: what its table and JSON say about the runs they summarize (a real tiny checkpoint, run
results written as the children print them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import load  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from hpcllm.checkpoint import convert
    from hpcllm.devmodels import make_model

    root = tmp_path_factory.mktemp("bench-load")
    hf = make_model("llama", root / "hf", size="tiny")
    convert(hf, root / "ckpt", progress=False)
    return {"hf": hf, "ckpt": root / "ckpt", "bin": root / "bin"}


def run(round_, resident, residency, nbytes=1000, note="odirect"):
    return {"round": round_, "ready": resident / 2, "resident": resident, "residency_before": residency,
            "fingerprint": 1.0, "bytes": nbytes, "note": note, "load_average": 1.0}


def summarize(raw, paths):
    return load.summarize(raw, {}, paths, "small", 3, True, "fadvise", {}, 1.0)


def test_a_cold_row_whose_median_holds_a_run_that_was_not_cold_says_so(paths):
    # Round 1's files were half in the page cache: its fast time is in the median, so the row must say it (the
    # last run's note, all the table showed, was clean).
    raw = {"hpcllm_disk": {"cold": [run(0, 3.0, 0.0), run(1, 1.0, 0.5), run(2, 3.1, 0.0)]},
           "safetensors": {"cold": [run(0, 3.2, 0.0), run(1, 3.3, 0.0), run(2, 3.4, 0.0)]}}
    rows = {row["method"]: row for row in summarize(raw, paths)["rows"]}
    assert rows["hpcllm_disk"]["note"].startswith("NOT COLD in 1 of 3 runs (up to 50% in the page cache)")
    assert "NOT COLD" not in rows["safetensors"]["note"]


def test_a_run_that_was_not_cold_is_left_out_of_the_cold_median_and_targets(paths):
    # Round 1 found half its files in the page cache: its 1.0 s is a warm load's time, not a cold one's.
    raw = {"hpcllm_disk": {"cold": [run(0, 3.0, 0.0), run(1, 1.0, 0.5), run(2, 3.2, 0.0)]},
           "safetensors": {"cold": [run(0, 3.3, 0.0), run(1, 3.3, 0.0), run(2, 3.3, 0.0)]}}
    report = summarize(raw, paths)
    row = next(r for r in report["rows"] if r["method"] == "hpcllm_disk")
    assert row["resident_s"] == pytest.approx(3.1)  # rounds 0 and 2
    assert "left out of the median" in row["note"]
    target = report["targets"]["cold: faster than safetensors"]
    assert target["value"] == pytest.approx(round(3.3 / 3.1, 2)) and len(target["per_round"]) == 2


@pytest.mark.parametrize("not_cold", ["hpcllm_disk", "safetensors"])
def test_no_cold_target_is_built_on_a_row_none_of_whose_runs_was_cold(paths, not_cold):
    # Every "cold" run of one side found its files in the page cache: a comparison with it says nothing of cold loads.
    raw = {method: {"cold": [run(i, 1.0 if method == not_cold else 3.0, 0.9 if method == not_cold else 0.0)
                             for i in range(3)]} for method in ("hpcllm_disk", "safetensors")}
    report = summarize(raw, paths)
    assert [name for name in report["targets"] if name.startswith("cold")] == []
    row = next(r for r in report["rows"] if r["method"] == not_cold)
    assert "NOT COLD in 3 of 3 runs" in row["note"] and "no cold run" in row["note"]


@pytest.mark.parametrize("argv, says", [(["--states", "cold,wram"], "--states"), (["--states", ","], "--states"),
                                        (["--runs", "0"], "--runs"), (["--runs", "-1"], "--runs"),
                                        # states that none of the chosen methods has ran nothing
                                        (["--methods", "hpcllm_dram", "--states", "cold"], "--states"),
                                        (["--methods", "hpcllm_dram", "--states", "shm,warm"], "--states"),
                                        (["--methods", ","], "--methods")])
def test_bad_arguments_get_one_line_before_anything_runs(monkeypatch, capsys, argv, says):
    # A misspelt state ran none of its loads (the table just lacked them); --runs 0 ran the default 3.
    monkeypatch.setattr(load, "prepare", lambda *a: pytest.fail("the bench started"))
    monkeypatch.setattr(sys, "argv", ["load.py", "--quick", "--methods", "hpcllm_disk", *argv])
    with pytest.raises(SystemExit) as exit_:
        load.main()
    assert exit_.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]


def test_the_default_states_are_the_chosen_methods(monkeypatch):
    # hpcllm_dram has only the shm state: the default --states must not be refused for it.
    class Started(Exception):
        pass

    def prepare(*args):
        raise Started

    monkeypatch.setattr(load, "prepare", prepare)
    monkeypatch.setattr(sys, "argv", ["load.py", "--quick", "--methods", "hpcllm_dram"])
    with pytest.raises(Started):
        load.main()


def _model(weight):
    import torch

    model = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.weight = torch.nn.Parameter(weight, requires_grad=False)
    return model


def test_the_same_weights_check_compares_dtype_and_every_byte():
    # The check summed a sample of each tensor as float32: a loader that upcast bf16 weights to float32, or changed
    # a value the sample skipped, had the same fingerprint ("same weights everywhere").
    import torch

    weight = torch.linspace(-1, 1, 64 * 256).reshape(64, 256).to(torch.bfloat16)
    reference = load.weights_fingerprint(_model(weight))
    assert load.weights_fingerprint(_model(weight.clone())) == reference
    assert load.weights_fingerprint(_model(weight.float())) != reference
    changed = weight.clone()
    changed[0, 1] += 1  # not among the elements the float32 sum sampled
    assert load.weights_fingerprint(_model(changed)) != reference
    assert load.weights_fingerprint(_model(weight.reshape(128, 128))) != reference
