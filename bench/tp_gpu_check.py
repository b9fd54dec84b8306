"""Tensor parallelism on GPUs through hpcllm's own path (bench/gpu_check.sh step 4; docs/gpu-checks.md).

Builds the small seeded dev Llama (6 heads, 2 KV heads, float32), converts it, and launches
`python -m hpcllm.tp.selfcheck CKPT --device cuda` under MPI: each rank loads its shard with the MPI-coordinated
loader (hpcllm.tp.mpiload) onto the GPU of its node-local rank, the collectives run over NCCL (torch.distributed,
rendezvous through MPI: hpcllm.tp.worker.collective_and_device, what `hpcllm worker --tensor-parallel` runs), and
rank 0 drives greedy decoding through the step broadcast. Rank 0 then compares the tokens with transformers'
`generate` on its GPU. Prints load time and bytes read per rank and the TP decode tokens/s.

- >= 2 visible GPUs: 2 ranks on cuda:0 and cuda:1 (--ranks for more).
- 1 GPU: says so and runs 1 rank (NCCL init and an all-reduce with world size 1, the shard loaded to cuda:0,
  greedy == generate); NCCL refuses two ranks on one GPU, so 2 ranks need 2 GPUs.
- no CUDA: prints `skipped` and exits 0 (like bench/vllm_gpu_check.py).
- no mpi4py or no MPI launcher: says what to install or carry and exits 1.

Why MPI and not torchrun: hpcllm's TP ranks learn rank, size and the NCCL rendezvous from MPI and load through MPI
collectives (rank 0 broadcasts the plan, the ranks exchange load status), as under `srun --mpi=pmix`. Launching with
torch.multiprocessing would need a second, test-only rendezvous and leave the production path untested. The device
machine is not known to have an MPI launcher, so `make gpu-wheels` carries MPICH as a wheel (`mpich`: mpiexec +
libmpi) with mpi4py, and bench/gpu_check.sh unpacks it and points mpi4py at it (MPI4PY_LIBMPI).

    python bench/tp_gpu_check.py [--ranks N] [--tokens 32] [--workdir /tmp/hpcllm-tp-gpu] [--device cpu]

`--device cpu` runs the same launch on CPU ranks (mpi4py collectives): how the launcher is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchkit import require_at_least  # noqa: E402

PROMPT = "The cluster scheduler"
INSTALL_MPI = ("install or carry an MPI: on the device machine run `make gpu-wheels` here (it adds the mpi4py and "
               "mpich wheels to .whl) and carry .whl, bench/gpu_check.sh unpacks them; on a GPU node, OpenMPI "
               "(e.g. `apt install openmpi-bin` or the site's `module load openmpi`) and `pip install mpi4py`")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=0, help="default: 2 with >= 2 GPUs (or on CPU), else 1")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens to generate")
    parser.add_argument("--workdir", default="/tmp/hpcllm-tp-gpu")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole MPI launch")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "tokens")
    require_at_least(parser, args, 0, "ranks")

    ranks = args.ranks or 2
    if args.device == "cuda":
        gpus = visible_gpus()
        if gpus == 0:
            print("tp_gpu_check: skipped: CUDA is not available (torch sees no GPU); the NCCL path needs a CUDA torch "
                  "and at least one GPU")
            return 0
        if args.ranks > gpus:
            print(f"tp_gpu_check: error: --ranks {args.ranks} needs {args.ranks} GPUs, {gpus} visible "
                  f"(NCCL takes one GPU per rank)")
            return 1
        if gpus == 1:
            print("tp_gpu_check: one GPU visible: checking the 1-rank CUDA path of the tensor-parallel worker (NCCL "
                  "init and all-reduce with world size 1, shard loaded to cuda:0, greedy == generate); the 2-rank "
                  "NCCL collectives need >= 2 GPUs and did NOT run")
        ranks = args.ranks or min(2, gpus)
    launcher, problem = find_mpi()
    if problem:
        print(f"tp_gpu_check: not run: {problem}; {INSTALL_MPI}")
        return 1
    checkpoint = build_checkpoint(Path(args.workdir))
    return run_ranks(launcher, ranks, checkpoint, args.device, args.tokens, args.timeout)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def find_mpi() -> tuple[str | None, str | None]:
    """(the MPI launcher, None) or (None, what is missing). mpi4py is probed in a child: importing mpi4py.MPI here
    would initialise MPI in the launcher process itself."""
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None:
        return None, "no MPI launcher (mpirun or mpiexec) on PATH"
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"mpi4py cannot start MPI in {sys.executable} ({last})"
    print(f"tp_gpu_check: MPI: {launcher}; {probe.stdout.strip().splitlines()[0]}")
    return launcher, None


def build_checkpoint(workdir: Path) -> Path:
    from hpcllm.checkpoint.converter import convert
    from hpcllm.devmodels import make_model

    hf_dir = make_model("llama", workdir / "hf-small", size="small", overwrite=True)
    return convert(hf_dir, workdir / "small-llama", overwrite=True, progress=False).root


def run_ranks(launcher: str, ranks: int, checkpoint: Path, device: str, tokens: int, timeout: float) -> int:
    command = [launcher, "-n", str(ranks), sys.executable, "-m", "hpcllm.tp.selfcheck", str(checkpoint),
               "--device", device, "--generate", str(tokens), "--prompt", PROMPT, "--timeout", str(timeout / 2)]
    # OpenMPI refuses root without both (the device tool may run as root); MPICH ignores them.
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    print("tp_gpu_check: " + " ".join(command), flush=True)
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        print(f"tp_gpu_check: FAILED: the {ranks} ranks did not finish within {timeout:.0f} s "
              f"(a hung NCCL or MPI call?)\n{_text(exc.stdout)}{_text(exc.stderr)}")
        return 1
    seconds = time.perf_counter() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith("result: ")]
    if completed.returncode != 0 or not lines:
        print(f"tp_gpu_check: FAILED: exit status {completed.returncode}\n{completed.stdout}{completed.stderr}")
        return 1
    return report(json.loads(lines[-1].removeprefix("result: ")), seconds)


def report(result: dict, seconds: float) -> int:
    print(f"tp_gpu_check: {result['ranks']} rank(s) on {result['device']} (rank 0's device), whole launch "
          f"{seconds:.1f} s")
    # build s: of the load, the model's assembly from the slices and its move to the device
    print(f"{'rank':>4}  {'host':<20} {'imports s':>9} {'load s':>7} {'build s':>7} {'bytes read':>12} {'reads':>6}")
    for stats in result["stats"]:
        print(f"{stats['rank']:>4}  {stats['host']:<20} {stats.get('import_seconds', 0.0):>9.2f} "
              f"{stats['seconds']:>7.2f} {stats.get('build_seconds', 0.0):>7.2f} {stats['bytes_read']:>12} "
              f"{stats['reads']:>6}")
    print(f"TP greedy decode: {len(result['tp_tokens'])} tokens at {result['tp_tokens_per_s']} tokens/s "
          f"(prompt {result['prompt_tokens']} tokens, one step per token, batch 1)")
    print(f"max |logit difference| against the whole model on one device: {result['max_abs_logit_diff']:.3g}")
    if result["tp_tokens"] != result["reference_tokens"]:
        print(f"tp_gpu_check: FAILED: TP tokens {result['tp_tokens']} != generate's {result['reference_tokens']}")
        return 1
    print(f"tp_gpu_check: OK: the {result['ranks']}-rank tokens equal transformers' generate")
    return 0


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


if __name__ == "__main__":
    sys.exit(main())
