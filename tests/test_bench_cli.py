"""Every bench CLI refuses a count or size of zero or less with one usage line before it starts anything (they ran
nothing, forever, or into a traceback deep in the run). Device choices: bench/migration.py (its own test), and
engine_gpu.py, host_register.py, tp_gpu_check.py, vllm_gpu_check.py, which say 'skipped' without CUDA."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CASES = [
    ("agent_start", ["--runs", "0"], "--runs must be at least 1"),
    ("agent_start", ["--gpus", "-1"], "--gpus must be at least 0"),
    ("cache_on_load", ["--source", "/nonexistent", "--runs", "0"], "--runs must be at least 1"),
    ("decode_step", ["--steps", "0"], "--steps must be at least 1"),
    ("decode_step", ["--context", "0", "5"], "--context must be at least 1"),
    ("engine_loop", ["--clients", "0"], "--clients must be at least 1"),
    ("gateway_stream", ["--clients", "16", "0"], "--clients must be at least 1"),
    ("gateway_stream", ["--tokens", "0"], "--tokens must be at least 1"),
    ("model_process_start", ["--rounds", "0"], "--rounds must be at least 1"),
    ("pool_read", ["--block-mib", "0"], "--block-mib must be at least 1"),
    ("priority", ["--slots", "0"], "--slots must be at least 1"),
    ("priority", ["--batch", "-1"], "--batch must be at least 0"),
    ("step_memory", ["--prefill", "-1"], "--prefill must be at least 0"),
    ("step_memory", ["--decodes", "0", "--prefill", "0"], "--decodes 0 with --prefill 0 is an empty step"),
    ("thinking_budget", ["--rounds", "0"], "--rounds must be at least 1"),
    ("tp", ["--layers", "0"], "--layers must be at least 1"),
    ("tp", ["--gap-bytes", "-1"], "--gap-bytes must be at least 0"),
    ("tp_gpu_check", ["--tokens", "0"], "--tokens must be at least 1"),
    ("tp_gpu_check", ["--ranks", "-2"], "--ranks must be at least 0"),
    ("warm", ["--size-mb", "0"], "--size-mb must be at least 1"),
    ("worker_stream", ["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ("serve", ["--threads", "0"], "--threads must be at least 1"),
    ("serve", ["--concurrency", "4", "0"], "--concurrency must be at least 1"),
    ("simulate", ["--jobs", "0"], "--jobs must be at least 1"),
    ("simulate", ["--compare", "/nonexistent.json", "--seeds", "0"], "--seeds must be at least 1"),
    ("simulate", ["--nodes", "0"], "--nodes must be at least 1"),
    ("simulate", ["--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
    ("simulate", ["--queue-wait", "-1"], "--queue-wait and --preempt-rate must be >= 0, not -1.0 and 0.05"),
    ("stream_mux", ["--streams", "16", "0"], "--streams must be at least 1"),
    ("stream_mux", ["--steps", "0"], "--steps must be at least 1"),
    ("stream_mux", ["--rounds", "0"], "--rounds must be at least 1"),
    ("embed", ["--chunk", "0"], "--chunk must be at least 1"),
    ("embed", ["--tokens", "8", "0"], "--tokens must be at least 1"),
    ("engine_gpu", ["--concurrency", "1", "0"], "--concurrency must be at least 1"),
    ("host_register", ["--chunk-mib", "0"], "--chunk-mib must be at least 1"),
]


@pytest.mark.parametrize("bench, argv, says", CASES, ids=[f"{b} {' '.join(a)}" for b, a, _ in CASES])
def test_a_count_or_size_below_its_minimum_is_one_usage_line(monkeypatch, capsys, bench, argv, says):
    module = importlib.import_module(f"bench.{bench}")
    monkeypatch.setattr(sys, "argv", [f"{bench}.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]


def test_a_source_that_is_not_a_checkpoint_is_one_usage_line(monkeypatch, capsys, tmp_path):
    # bench/cache_on_load.py --source <not a converted checkpoint> was a MissingFile traceback from its first load.
    module = importlib.import_module("bench.cache_on_load")
    monkeypatch.setattr(sys, "argv", ["cache_on_load.py", "--source", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2 and "no such checkpoint folder" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv", [["--prefill", "0"], ["--decodes", "0"]], ids=["decode-only", "prefill-only"])
def test_step_memory_measures_a_decode_only_or_a_prefill_only_step(monkeypatch, capsys, argv):
    # --prefill 0 is a step without a prefill chunk and --decodes 0 one without decodes: both measure a real step,
    # and were refused as 'must be at least 1'. Only both at 0 (an empty step) is refused, above.
    module = importlib.import_module("bench.step_memory")
    measured = []
    monkeypatch.setattr(module, "measure", lambda args: measured.append((args.decodes, args.prefill)) or 1.0)
    monkeypatch.setattr(sys, "argv", ["step_memory.py", *argv, "--child", "kept"])
    assert module.main() == 0
    assert measured == [(0 if "--decodes" in argv else 55, 0 if "--prefill" in argv else 500)]
