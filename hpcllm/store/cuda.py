"""The CUDA side of the loader: pinned staging slots, a copy engine on a dedicated stream, device buffers.

Reads land in pinned (page-locked) host slots; `copy_(non_blocking=True)` on a side stream turns each into an
asynchronous DMA to the device, and a CUDA event recorded after it is the slot's fence (StagingRing reuses the slot
only after the event). The readers keep filling other slots meanwhile, so disk reads and host-to-device copies
overlap and the staging memory stays bounded (a few chunks) whatever the model size.

Importing this module needs torch but not a GPU; every function that touches CUDA checks for it first.
"""

from __future__ import annotations

import torch

from hpcllm.errors import ConfigError
from hpcllm.store.memory import PAGE_SIZE
from hpcllm.store.ring import Copy, Fence, Slot


class CudaUnavailable(ConfigError):
    """A CUDA device was asked for where this process has none (or not that one): the device setting is to fix."""


def require_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise CudaUnavailable(f"device {device} requested but CUDA is not available in this process "
                              f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CudaUnavailable(f"device {device} requested but only {torch.cuda.device_count()} GPU(s) are visible")


class CudaFence:
    def __init__(self, event: "torch.cuda.Event"):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()  # releases the GIL while it waits


class CudaCopyEngine:
    """Host-to-device copies of staged slots on one dedicated stream per device.

    Create it after the destination buffers were allocated, on the thread (and current stream) that will use the
    model: the buffers come from the caching allocator on that stream, which may hand out memory whose previous
    user's kernels are still queued there, so the copy stream first waits for it. At the end the caller's stream
    waits for the copy stream (and the host has synchronised with it), so the model's first forward pass - on
    the caller's stream, whatever thread ran the copies - sees every weight.
    """

    def __init__(self, device: torch.device):
        require_cuda(device)
        self.device = device
        self.consumer = torch.cuda.current_stream(device)  # the caller's stream: thread-local, so taken here
        self.stream = torch.cuda.Stream(device=device)
        self.stream.wait_stream(self.consumer)

    def copy(self, slot: Slot, copies: list[Copy]) -> Fence:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for c in copies:
                c.dest[c.dest_offset:c.dest_offset + c.nbytes].copy_(
                    slot.tensor[c.src_offset:c.src_offset + c.nbytes], non_blocking=True)
            # blocking: a reader waiting for this slot sleeps in cudaEventSynchronize instead of spinning a core
            event = torch.cuda.Event(blocking=True)
            event.record(self.stream)
        return CudaFence(event)

    def finish(self) -> None:
        self.stream.synchronize()
        self.consumer.wait_stream(self.stream)


def pinned_slots(count: int, size: int) -> list[Slot]:
    """`count` page-aligned, page-locked staging slots of `size` bytes (O_DIRECT reads straight into them)."""
    return [pinned_slot(index, size) for index in range(count)]


def pinned_slot(index: int, size: int) -> Slot:
    """One page-aligned, page-locked staging slot of `size` bytes.

    torch's pinned-memory allocator hands out whole cudaHostAlloc blocks (page-aligned) rounded up to a power of
    two, so `size` is asked for as is (a 16 MiB slot is one 16 MiB block); only a misaligned block - a different
    allocator - is given back for one a page larger to align inside. A first allocation in a process pins fresh
    pages (~2.5 GB/s on the H200 machine, from a cold load's time split); blocks an earlier load freed come from
    torch's cache.
    """
    raw = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    if raw.data_ptr() % PAGE_SIZE:
        raw = torch.empty(size + PAGE_SIZE, dtype=torch.uint8, pin_memory=True)
    skip = (-raw.data_ptr()) % PAGE_SIZE
    tensor = raw[skip:skip + size]
    return Slot(index=index, view=memoryview(tensor.numpy()), tensor=tensor, size=size)


def device_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """One uint8 buffer on `device` holding a partition's tensors; the model's tensors become views of it."""
    require_cuda(device)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)
