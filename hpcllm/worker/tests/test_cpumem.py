"""cpumem.keep_freed_memory: a process that steps a CPU model keeps its freed activations mapped between steps
(what a user sees: CPU steps with large activations that do not fault their memory in again every step;
bench/step_memory.py measures that)."""

import subprocess
import sys
from pathlib import Path

from hpcllm.worker import cpumem
from hpcllm.worker.runner import PagedRunner

ROOT = Path(__file__).resolve().parents[3]
# RSS after a 16 MiB tensor was written and freed, relative to before it: glibc's defaults unmap such a block on free.
PROBE = """
import sys, torch
from hpcllm.worker import cpumem
if sys.argv[1] == "kept":
    cpumem.keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
block = torch.ones(16 << 20, dtype=torch.uint8)
del block
print(rss() - before)
"""


def _retained_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120).stdout
    return int(out.strip().splitlines()[-1])


def test_freed_activations_stay_mapped_only_with_the_kept_heap():
    assert _retained_after_free("default") < 4 << 20  # unmapped on free: the next step faults 16 MiB in again
    assert _retained_after_free("kept") > 12 << 20  # kept on the heap for the next step


def test_a_cpu_runner_keeps_the_heap(load_pair):
    model, _ = load_pair("llama")
    PagedRunner(model, num_blocks=16, block_size=4)
    assert "stay on the heap" in cpumem.keep_freed_memory()
