"""Load a converted checkpoint as an N-rank tensor-parallel model and check it against the 1-rank model.

    mpirun -n 2 python -m hpcllm.tp.selfcheck CKPT [--generate 16] [--prompt TEXT]

Every rank loads its shard (hpcllm.tp.mpiload); rank 0 then drives greedy decoding through the step broadcast
(the followers run `follow`), loads the whole model itself with hpcllm.store.load_model and compares: last-position
logits of the prompt and the greedy tokens against transformers' `generate`. Rank 0 prints one line
`result: {json}` (per-rank bytes read, the logits difference, both token lists). Any rank's failure prints
`error: rank R on HOST: ...` on every rank and exits 1.

Test knobs: `--path-of-rank R=PATH` (that rank reads its data files from PATH: a damaged copy), `--slice-copy-of-rank
R=DIR` (that rank's slice copy), `--memory-limit-rank
R --memory-limit-mb M` (an address-space limit on that rank, so its allocations fail like out-of-memory),
`--no-reference` (skip rank 0's whole-model load, e.g. in benchmarks).

`--device cuda`: the GPU path of `hpcllm worker --tensor-parallel` (hpcllm.tp.worker.collective_and_device): every
rank takes the GPU of its node-local rank and the collectives run over NCCL (torch.distributed, rendezvous through
MPI); the check first all-reduces a vector over NCCL (size 1 too), and the reference runs on rank 0's GPU.
bench/tp_gpu_check.py launches it on the GPU machine.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time

import click


@click.command()
@click.argument("checkpoint")
@click.option("--generate", "new_tokens", type=int, default=16, show_default=True)
@click.option("--prompt", default="The cluster scheduler", show_default=True)
@click.option("--path-of-rank", "rank_paths", multiple=True, help="R=PATH: rank R reads its data from PATH.")
@click.option("--slice-copy-of-rank", "rank_copies", multiple=True,
              help="R=DIR: rank R reads what its slice copy DIR holds from there (hpcllm.tp.slicecache).")
@click.option("--memory-limit-rank", type=int, default=None)
@click.option("--memory-limit-mb", type=int, default=0)
@click.option("--gap-bytes", type=int, default=None, help="Coalescing gap of the slice reads (default: reader's).")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True)
@click.option("--reference/--no-reference", default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: one GPU per node-local rank, NCCL collectives (the GPU worker's path).")
@click.option("--threads", type=int, default=0,
              help="Torch threads per rank; 0: the node's cores divided among the ranks on it.")
def main(checkpoint: str, new_tokens: int, prompt: str, rank_paths: tuple[str, ...], rank_copies: tuple[str, ...],
         memory_limit_rank: int | None,
         memory_limit_mb: int, gap_bytes: int | None, timeout_s: float, reference: bool, threads: int,
         device: str) -> None:
    import torch
    from mpi4py import MPI

    from hpcllm.mpi import comm_world
    from hpcllm.tp.mpiload import load_shard

    comm = comm_world()
    rank = comm.Get_rank()
    ranks_here = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_size()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // ranks_here))
    paths = dict(item.split("=", 1) for item in rank_paths)
    path = paths.get(str(rank), checkpoint)
    if memory_limit_rank == rank and memory_limit_mb:
        _limit_memory(checkpoint, memory_limit_mb)
    try:
        collective, device = _collective(comm, device)
        loaded = load_shard(path, comm, timeout_s=timeout_s, gap_bytes=gap_bytes, device=device,
                            collective=collective,
                            slice_copy=dict(item.split("=", 1) for item in rank_copies).get(str(rank)))
    except Exception as exc:  # noqa: BLE001 - every rank reports, then exits non-zero
        print(f"error: rank {rank} on {socket.gethostname()}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    _serve_checks(comm, loaded, checkpoint, prompt, new_tokens, reference, device)


def _collective(comm, device: str):
    """The worker's own choice (hpcllm.tp.worker): mpi4py on CPU; on CUDA NCCL, proven by one all-reduce first so
    that a broken NCCL set-up fails here, naming NCCL, rather than inside the model's first forward."""
    import torch

    from hpcllm.tp.worker import collective_and_device

    collective, device = collective_and_device(comm, device)
    if collective is not None:
        probe = torch.full((1024,), float(comm.Get_rank() + 1), device=device)
        collective.allreduce_sum_(probe)
        expected = comm.Get_size() * (comm.Get_size() + 1) / 2
        if not bool((probe == expected).all()):
            raise RuntimeError(f"NCCL all-reduce over {comm.Get_size()} ranks gave {probe[0].item()}, "
                               f"expected {expected}")
    return collective, device


def _limit_memory(checkpoint: str, megabytes: int) -> None:
    """Allow this process `megabytes` more address space than it has once the model code is imported (the
    imports map hundreds of MB of libraries: the limit is meant for the load's own allocations)."""
    from transformers import AutoConfig

    import hpcllm.tp.mpiload  # noqa: F401
    import hpcllm.tp.reader  # noqa: F401
    from hpcllm.store.skeleton import import_model_code

    import_model_code(AutoConfig.from_pretrained(checkpoint))
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (vm_kb << 10) + (megabytes << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _serve_checks(comm, loaded, checkpoint: str, prompt: str, new_tokens: int, reference: bool,
                  device: str) -> None:
    import torch

    from hpcllm.tp.serve import LeadRunner, ShardRunner, StepChannel, follow, greedy_generate

    channel, runner = StepChannel(comm), ShardRunner(loaded.model)
    if loaded.rank != 0:
        follow(channel, runner)
        return
    lead = LeadRunner(channel, runner)
    if loaded.tokenizer is None:
        lead.stop()
        print(f"error: rank 0 on {socket.gethostname()}: {checkpoint} has no tokenizer files: the check tokenizes its "
              f"--prompt", file=sys.stderr, flush=True)
        sys.exit(1)
    try:
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
        began = time.perf_counter()
        tp_logits = lead.forward("logits", prompt_ids, 0).float().clone()
        tokens = greedy_generate(lead, prompt_ids, new_tokens)
        tp_seconds = time.perf_counter() - began
    finally:
        lead.stop()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result = {"ranks": loaded.size, "device": device, "prompt_tokens": len(prompt_ids), "tp_tokens": tokens,
              "tp_tokens_per_s": round(len(tokens) / tp_seconds, 2), "stats": loaded.all_stats}
    if reference:
        from hpcllm.store import load_model

        ref_model = load_model(checkpoint, tokenizer=False, device=device).model
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=device)
            ref_logits = ref_model(ids).logits[0, -1].float()
            ref_tokens = ref_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            pad_token_id=ref_model.config.eos_token_id)[0, len(prompt_ids):]
        result.update(max_abs_logit_diff=float((tp_logits - ref_logits).abs().max()),
                      reference_tokens=[int(t) for t in ref_tokens])
    print("result: " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
