"""Tensor-parallel loading and decoding on CPU ranks: bytes read and load time per rank, tokens/s, at 1, 2 and 4 ranks.

    .venv/bin/python bench/tp.py [--ranks 1,2,4] [--tokens 32] [--runs 2] [--layers 4] [--gap-bytes N]
                                 [--no-slice-copies]

Every configuration is `mpirun -n R python -m hpcllm.tp.selfcheck CKPT --no-reference` on the same converted
checkpoint (one checkpoint, every degree): each rank reads and verifies only its slices (hpcllm.tp.reader),
rank 0 drives greedy decoding and the followers run the same steps, reducing with mpi4py. The baseline is the
1-rank run of the same script in the same invocation: one process loading everything through the same code. The
data files are evicted from the page cache (posix_fadvise DONTNEED) before every run, so every load reads from
the disk. Printed: per configuration the median over runs of the bytes read per rank (max over ranks), the share
of the checkpoint that is, the slowest rank's slice read time (reads + verification) and its time to a ready
shard (process start to model built: mostly importing transformers), and decoding tokens/s, with ratios to 1 rank;
then every rank of every run: bytes and read requests, how many of them came from a slice copy, read and ready time.

With slice copies (the default; `--no-slice-copies` skips them), every degree > 1 also runs with each rank reading
from its own slice copy (hpcllm.tp.slicecache, what `hpcllm cache warm --tensor-parallel N` keeps on a rank's node;
written once before the runs, evicted from the page cache like the checkpoint): one contiguous read per tensor,
dim-1 (row-parallel) slices included. On this one-disk machine the copies live on the same disk as the checkpoint,
so this shows the bytes and requests a rank saves, not a faster tier.

The bench model is a Llama with 16 heads / 4 KV heads (degree 4 fits), hidden 1024, MLP 2816, the dev
tokenizer's 1024-token vocabulary, fp32: ~74 MB at 4 layers. On a 2-core machine 4 ranks oversubscribe the cores:
read the tokens/s column as "what the collectives cost", not as a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchkit import require_at_least  # noqa: E402
from hpcllm.store.readers import evict_from_page_cache  # noqa: E402

WORK = Path("/var/tmp/hpcllm-bench/tp")
MPI_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONPATH": str(REPO)}


def bench_checkpoint(layers: int) -> Path:
    converted = WORK / f"llama-tp-{layers}l"
    if (converted / "manifest.json").exists():
        return converted
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcllm.checkpoint import convert
    from hpcllm.devmodels.builder import make_model

    tokenizer_source = make_model("llama", WORK / "tokenizer-source", overwrite=True)
    hf = WORK / f"llama-tp-{layers}l-hf"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False,
                         max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_source / name).exists() and not (hf / name).exists():
            shutil.copy(tokenizer_source / name, hf / name)
    convert(hf, converted, progress=False)
    return converted


def slice_copies(ckpt: Path, degree: int) -> list[Path]:
    """Each rank's slice copy of the bench checkpoint (written once, reused while the checkpoint is the same)."""
    from hpcllm.tp.slicecache import manifest_fingerprint, usable_slice_copy, write_slice_copy

    copies = []
    for rank in range(degree):
        folder = WORK / f"{ckpt.name}-slices" / f"tp{degree}.r{rank}"
        if usable_slice_copy(folder, degree, rank, manifest_fingerprint(ckpt)) is None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            write_slice_copy(ckpt, degree, rank, folder)
        copies.append(folder)
    return copies


def run(ckpt: Path, ranks: int, tokens: int, gap_bytes: int | None, copies: list[Path] | None = None) -> dict:
    evict_from_page_cache(p for p in ckpt.iterdir() if p.is_file())
    for folder in copies or []:
        evict_from_page_cache(p for p in folder.iterdir() if p.is_file())
    command = ["mpirun", "-n", str(ranks), "--oversubscribe", "--mca", "mpi_yield_when_idle", "1", sys.executable,
               "-m", "hpcllm.tp.selfcheck", str(ckpt), "--no-reference", "--generate", str(tokens)]
    if gap_bytes is not None:
        command += ["--gap-bytes", str(gap_bytes)]
    for rank, folder in enumerate(copies or []):
        command += ["--slice-copy-of-rank", f"{rank}={folder}"]
    done = subprocess.run(command, env=MPI_ENV, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{done.stdout}\n{done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("result: "))
    return json.loads(line.removeprefix("result: "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gap-bytes", type=int, default=None,
                        help="coalescing gap of slice reads (0: one read per row share of dim-1 slices)")
    parser.add_argument("--no-slice-copies", dest="slice_copies", action="store_false",
                        help="skip the runs that read each rank's slice copy")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "tokens", "runs", "layers")
    require_at_least(parser, args, 0, "gap_bytes")
    from hpcllm.checkpoint import read_checkpoint

    ckpt = bench_checkpoint(args.layers)
    total = read_checkpoint(ckpt).total_bytes
    degrees = [int(r) for r in args.ranks.split(",")]
    configs = [(r, False) for r in degrees] + [(r, True) for r in degrees if r > 1 and args.slice_copies]
    copies = {r: slice_copies(ckpt, r) for r, use in configs if use}
    results: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
    for _ in range(args.runs):  # round-robin: the machine's load drifts, every configuration sees the same drift
        for ranks, use in configs:
            results[(ranks, use)].append(run(ckpt, ranks, args.tokens, args.gap_bytes, copies.get(ranks) if use
                                             else None))

    rows = {}
    for (ranks, use), runs in results.items():
        rows[(ranks, use)] = {
            "bytes_per_rank": statistics.median(max(s["bytes_read"] for s in r["stats"]) for r in runs),
            "read_s": statistics.median(max(s["read_seconds"] for s in r["stats"]) for r in runs),
            "ready_s": statistics.median(max(s["seconds"] for s in r["stats"]) for r in runs),
            "reads_per_rank": statistics.median(max(s["reads"] for s in r["stats"]) for r in runs),
            "tokens_per_s": statistics.median(r["tp_tokens_per_s"] for r in runs),
            "tokens": runs[0]["tp_tokens"],
        }
    base = rows[configs[0]]
    print(f"checkpoint {ckpt} ({total / 1e6:.1f} MB), {args.runs} runs, {args.tokens} greedy tokens, cold page "
          f"cache; baseline = {degrees[0]} rank(s) loading everything, in this run; {os.cpu_count()} CPU(s)")
    print(f"{'ranks':>5} {'reads from':>13} {'MB read/rank (max)':>19} {'share':>6} {'reads/rank':>10} "
          f"{'read s (slowest)':>17} {'ready s':>8} {'tokens/s':>9} {'vs base':>8} same tokens")
    for (ranks, use), row in rows.items():
        print(f"{ranks:>5} {'slice copies' if use else 'checkpoint':>13} {row['bytes_per_rank'] / 1e6:>19.2f} "
              f"{row['bytes_per_rank'] / total:>6.2f} {row['reads_per_rank']:>10.0f} {row['read_s']:>17.3f} "
              f"{row['ready_s']:>8.2f} {row['tokens_per_s']:>9.1f} {row['tokens_per_s'] / base['tokens_per_s']:>8.2f} "
              f"{row['tokens'] == base['tokens']}")
    print("\nper rank (every run):")
    print(f"{'ranks':>5} {'reads from':>13} {'run':>3} {'rank':>4} {'MB read':>8} {'reads':>6} {'from copy MB':>12} "
          f"{'read s':>7} {'ready s':>8}")
    for (ranks, use), runs in results.items():
        for number, r in enumerate(runs):
            for st in r["stats"]:
                print(f"{ranks:>5} {'slice copies' if use else 'checkpoint':>13} {number:>3} {st['rank']:>4} "
                      f"{st['bytes_read'] / 1e6:>8.2f} {st['reads']:>6} {st['cache_bytes'] / 1e6:>12.2f} "
                      f"{st['read_seconds']:>7.3f} {st['seconds']:>8.2f}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    named = {f"{ranks}{'-slice-copies' if use else ''}": value for (ranks, use), value in rows.items()}
    (out / "tp-latest.json").write_text(json.dumps(
        {"total_bytes": total, "rows": named,
         "runs": {f"{r}{'-slice-copies' if u else ''}": v for (r, u), v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
