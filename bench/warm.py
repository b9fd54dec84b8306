"""Warming N node caches: one MPI broadcast (origin read once) vs N independent copies (origin read N times).

    eval "$(bash slurm/devcluster.sh start)"
    .venv/bin/python bench/warm.py --nodes 'n[1-4]' --size-mb 512

Both runs go through the dev Slurm cluster: the broadcast is `hpcllm cache warm --mpi` (sbatch + srun --mpi=pmix,
one rank per node); the baseline is one `srun -N N --ntasks-per-node=1` step where every task copies the checkpoint
from the origin into its node's cache with CacheManager.warm (the agents' path), concurrently. Times include Slurm
scheduling for both. Between runs the page cache is dropped for the origin's files (fsync + posix_fadvise
DONTNEED) so each run starts with a cold origin.

On the dev cluster all fake nodes share one host: the "shared FS" is the local disk plus the page cache, and the
"network" is loopback, so the ratio here says little about a real cluster where N nodes contend for a shared FS.
The script says so in its output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from hpcllm.checkpoint import read_checkpoint  # noqa: E402
from hpcllm.config import load_config  # noqa: E402
from hpcllm.node.cache_cli import mpi_warm  # noqa: E402
from hpcllm.slurm.hostlist import expand_nodes  # noqa: E402
from hpcllm.store.readers import evict_from_page_cache  # noqa: E402

COPY_TASK = """
import os, sys
from hpcllm.node.cache import CacheManager
node = os.environ["SLURMD_NODENAME"]
cm = CacheManager(sys.argv[2].replace("{node}", node), 10**13, 10**9, "bench-warm")
cm.warm("bench", sys.argv[1], "nvme")
"""


def make_origin(work: Path, size_mb: int) -> Path:
    """A converted Llama of about size_mb MB (seeded random float32 weights): the converter takes only checkpoints
    transformers can build, so the layers are what scales."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcllm.checkpoint import convert

    hidden, ffn, vocab = 1024, 2816, 1024
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden  # attention, MLP, norms (float32 parameters)
    layers = max(1, (size_mb * 1_000_000 // 4 - 2 * vocab * hidden) // per_layer)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = work / "hf"
    LlamaForCausalLM(config).save_pretrained(hf)
    out = work / "origin"
    convert(hf, out, progress=False)
    shutil.rmtree(hf)
    return out


def drop_cache(origin: Path) -> None:
    # fsync first (evict_from_page_cache does): the freshly converted origin's pages are dirty and DONTNEED keeps them
    evict_from_page_cache(p for p in origin.iterdir() if p.is_file())


def run_independent(origin: Path, nodes: list[str], template: str) -> float:
    started = time.perf_counter()
    subprocess.run(["srun", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}", "--ntasks-per-node=1",
                    f"--nodelist={','.join(nodes)}", sys.executable, "-c", COPY_TASK, str(origin), template],
                   check=True, timeout=3600)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="n[1-4]", help="2-4 dev-cluster nodes (hostlist)")
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder under /var/tmp")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "size_mb")
    if not os.environ.get("SLURM_CONF"):
        sys.exit('SLURM_CONF is not set: eval "$(bash slurm/devcluster.sh start)" first')
    nodes = expand_nodes(args.nodes)
    work = Path(tempfile.mkdtemp(prefix="hpcllm-bench-warm-", dir=args.work_dir or "/var/tmp"))
    try:
        origin = make_origin(work, args.size_mb)
        total = read_checkpoint(origin).total_bytes
        config = load_config()

        drop_cache(origin)
        bcast_template = str(work / "bcast" / "{node}")
        started = time.perf_counter()
        mpi_warm(config, "bench", origin, nodes, bcast_template, 3600, log_dir=work / "logs", show_progress=False)
        t_bcast = time.perf_counter() - started

        drop_cache(origin)
        t_indep = run_independent(origin, nodes, str(work / "indep" / "{node}"))

        print(f"checkpoint {total / 1e6:.0f} MB -> {len(nodes)} nodes ({','.join(nodes)})")
        print(f"  MPI broadcast (origin read once)     {t_bcast:7.2f} s  {len(nodes) * total / t_bcast / 1e9:.2f} GB/s "
              f"written in all")
        print(f"  {len(nodes)} independent copies (read {len(nodes)}x)  {t_indep:7.2f} s  "
              f"{len(nodes) * total / t_indep / 1e9:.2f} GB/s written in all")
        print(f"  ratio independent / broadcast: {t_indep / t_bcast:.2f}x")
        print("note: the dev cluster's nodes share one host, so the 'shared FS' is the local disk and its page cache "
              "and MPI runs over loopback; on a real cluster N nodes reading one shared FS contend for it, which "
              "this run cannot show. Both times include Slurm scheduling.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
