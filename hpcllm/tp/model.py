"""One rank's shard of a tensor-parallel model: a transformers model holding local slices, plus collective hooks.

The model is the model's own transformers class, built on the meta device (hpcllm.store.skeleton), whose split
parameters get the local shapes before the rank's slices are attached. Attention and MLP code in transformers
reshape with `-1` heads, so a q/k/v projection holding heads [r*H/N, (r+1)*H/N) runs unchanged on its heads; what
TP adds is two collectives, installed as forward hooks on the modules the plan names:

  rowwise                  the module's output is a partial sum over its input slice: all-reduce (sum), then add
                           the bias once
  colwise_gather_output    the module's output holds this rank's share of the features: all-gather them along
                           the last dimension (the lm_head: every rank ends with the full logits)

Collectives: `MpiCollective` (mpi4py Allreduce/Allgather on CPU tensors: ~5 us for a small vector here, against
~2.5 ms for torch.distributed's gloo all-reduce) and `TorchDistCollective` (torch.distributed, the NCCL backend on
GPUs; the ranks find each other through MPI, see `init_torch_distributed`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hpcllm.tp.plan import COLWISE_GATHER, ROWWISE, ModulePlan

log = logging.getLogger(__name__)


class Collective(Protocol):
    rank: int
    size: int

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def allgather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor: ...


class SingleRank:
    """The collective of a group of one (a degree-1 'TP' model is the plain model)."""

    rank, size = 0, 1

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def allgather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class MpiCollective:
    """Collectives over an mpi4py communicator for CPU tensors (no copies for float32/float64)."""

    def __init__(self, comm: Any):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous():
            self.comm.Allreduce(self._mpi.IN_PLACE, tensor.detach().numpy(), op=self._mpi.SUM)
            return tensor
        # MPI has no bfloat16/float16 sum: reduce in float32 (also a more precise sum), then store back.
        widened = tensor.detach().float().contiguous()
        self.comm.Allreduce(self._mpi.IN_PLACE, widened.numpy(), op=self._mpi.SUM)
        tensor.copy_(widened)
        return tensor

    def allgather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.detach().contiguous()
        if local.numel() == 0:
            return _gathered_empty(local, self.size)
        raw = local.view(-1).view(torch.uint8).numpy()  # bytes: any dtype travels, nothing is summed
        gathered = torch.empty((self.size, raw.size), dtype=torch.uint8)
        self.comm.Allgather(raw, gathered.numpy())
        parts = gathered.view(local.dtype).reshape(self.size, *local.shape)
        return torch.cat(parts.unbind(0), dim=-1)


def _gathered_empty(local: torch.Tensor, size: int) -> torch.Tensor:
    """What gathering an empty tensor's last dimension gives, with no collective: every rank runs the same step, so
    every rank's part is empty too (a step of prefill chunks that want no logits: lm_head over zero rows)."""
    return local.new_empty((*local.shape[:-1], local.shape[-1] * size))


class TorchDistCollective:
    """Collectives through torch.distributed: the NCCL backend for CUDA tensors (the GPU path)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor

    def allgather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.contiguous()
        if local.numel() == 0:
            return _gathered_empty(local, self.size)
        gathered = torch.empty((self.size, *local.shape), dtype=local.dtype, device=local.device)
        self._dist.all_gather_into_tensor(gathered, local)
        return torch.cat(gathered.unbind(0), dim=-1)


def init_torch_distributed(comm: Any, backend: str = "nccl") -> TorchDistCollective:
    """torch.distributed over the ranks of an MPI communicator: rank 0 opens the rendezvous store on a port the
    system picks (a fixed port is taken by another instance's ranks on the same node) and its address and port
    travel by MPI bcast (no hand-passed MASTER_ADDR / MASTER_PORT); each rank uses the GPU of its node-local rank."""
    import torch.distributed as dist
    from mpi4py import MPI

    from torch.distributed import constants

    rank, size = comm.Get_rank(), comm.Get_size()
    # The store waits for late ranks as long as a process group does (the tcp:// rendezvous did), not TCPStore's 5 min.
    timeout = (constants.default_pg_nccl_timeout if backend == "nccl" else None) or constants.default_pg_timeout
    store = (dist.TCPStore(_routable_address(), 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
             if rank == 0 else None)
    address, port = comm.bcast((store.host, store.port) if rank == 0 else None, root=0)
    if rank != 0:
        store = dist.TCPStore(address, port, size, is_master=False, timeout=timeout)
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size)
    return TorchDistCollective()


def _routable_address() -> str:
    """This host's address on the interface that reaches other hosts (gethostbyname(hostname) can be 127.0.1.1)."""
    import socket

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def build_shard_model(config, tensors: dict[str, torch.Tensor], plan: ModulePlan, collective: Collective,
                      dtype: torch.dtype, index_path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model class of `config` holding this rank's `tensors` (local slices, views are kept), with the TP hooks."""
    from hpcllm.store.skeleton import attach, build_skeleton, loaded_dtypes

    config = copy.deepcopy(config)
    if collective.size > 1 and getattr(config, "tie_word_embeddings", False):
        # A tied lm_head is split while the embedding stays whole: they can no longer share one Parameter.
        config.tie_word_embeddings = False
    model = build_skeleton(config, dtype)
    # Slices come in their stored dtype: each floating one is converted to the dtype the model holds it in, as the
    # single-rank loader does (config.json may ask for another dtype than the checkpoint stores).
    dtype_of = loaded_dtypes(model, dtype)
    tensors = {name: t.to(dtype_of(name)) if t.is_floating_point() else t for name, t in tensors.items()}
    modules = dict(model.named_modules())
    for name, tensor in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        current = module._parameters.get(attr) if module is not None else None
        if current is not None and current.shape != tensor.shape:
            module._parameters[attr] = nn.Parameter(torch.empty(tensor.shape, dtype=current.dtype, device="meta"),
                                                    requires_grad=False)
    attach(model, {name: t.to(device) for name, t in tensors.items()}, {}, index_path)
    if collective.size > 1:
        install_hooks(model, plan, collective)
    return model


def install_hooks(model: nn.Module, plan: ModulePlan, collective: Collective) -> int:
    """Forward hooks doing the plan's collectives; returns how many modules got one."""
    installed = 0
    for name, module in model.named_modules():
        style = plan.style_of(name)
        if style == ROWWISE:
            bias = module._parameters.get("bias")
            if bias is not None:
                module._parameters["bias"] = None  # added once after the sum, not once per rank
            module.register_forward_hook(_reduce_hook(collective, bias))
            installed += 1
        elif style == COLWISE_GATHER:
            module.register_forward_hook(lambda _m, _a, output: collective.allgather_last_dim(output))
            installed += 1
    return installed


def _reduce_hook(collective: Collective, bias: torch.Tensor | None):
    def hook(_module, _args, output):
        output = collective.allreduce_sum_(output)
        return output if bias is None else output + bias

    return hook
