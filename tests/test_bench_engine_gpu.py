"""bench/engine_gpu.py (gpu_check.sh's engine step) on a machine without a GPU: it says so on CUDA, and its CPU run
serves every request to its own max_tokens through both paths and prints the ratio table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "engine_gpu.py"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=300)


def test_without_cuda_the_bench_is_skipped_saying_why(tiny_llama_dir):
    completed = _run("--model-dir", str(tiny_llama_dir), CUDA_VISIBLE_DEVICES="")

    assert completed.returncode == 0, completed.stderr
    assert "skipped: torch sees no CUDA device" in completed.stdout


def test_a_cpu_run_compares_continuous_batching_with_static_generate(tiny_llama_dir):
    completed = _run("--model-dir", str(tiny_llama_dir), "--device", "cpu", "--concurrency", "1", "3",
                     "--rounds", "2", "--max-output", "6", "--padding-allowance", "inf", "--cuda-graphs")

    assert completed.returncode == 0, completed.stderr
    assert "padding allowance inf" in completed.stdout
    # 2 rounds x 3 targets (--cuda-graphs: the static decode steps, uncaptured on a CPU)
    assert len(re.findall(r"C=  3 round \d (hpcllm|hpcllm-graphs|generate) ", completed.stdout)) == 6
    for target in ("hpcllm", "hpcllm-graphs"):
        ratios = re.search(rf"^{target} / generate\s+\|\s+([\d.]+)x \|\s+([\d.]+)x$", completed.stdout, re.M)
        assert ratios and all(float(r) > 0 for r in ratios.groups()), completed.stdout
