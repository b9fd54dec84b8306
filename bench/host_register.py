"""Can the DRAM tier feed a GPU at host-to-device speed? The loader's staged path against cudaHostRegister of the
tier's tmpfs mapping, same run, same bytes.

    PYTHONPATH=$PWD python bench/host_register.py [--gib 2] [--threads 8] [--chunk-mib 256] [--rounds 3]

A DRAM-tier -> GPU load today reads the tmpfs file into pinned staging slots (memory_copy_threads() threads, a
kernel copy each) and DMAs every slot on a side stream: on the H200 machine that ran at ~11-12 GB/s, the speed of
one pass of memcpy, where a DMA from pinned memory runs at ~55 GB/s. Registering the tier's pages with the driver
(cudaHostRegister of a read-only mapping of the file) lets the GPU read them where they are, with no copy; but
pinning costs time per page. Whether that pays, and whether it must happen ahead of a load (a spare worker
registering the node's DRAM tier while it waits), is what these rows say:

  staged           the loader's path reduced to its copies: threads preadv 16 MiB pieces of the file into pinned
                   slots (threads + 2 of them, allocated before the timer), each slot DMA'd on a side stream
  register+copy    cudaHostRegister of a fresh mapping of the whole file, one DMA, cudaHostUnregister
  chunked          the same per --chunk-mib piece, registering piece k+1 while piece k's DMA runs
  registered       the DMA alone, from a mapping registered before the timer (what a spare would have ready)
  pinned limit     the DMA from a cudaHostAlloc buffer of the same size

The registration and unregistration are also timed on their own. Every row is printed as x of `staged`, the
median of --rounds; the file lives in --dir (/dev/shm, the DRAM tier's filesystem) and is removed at the end.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchkit import require_at_least  # noqa: E402

REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the tier's files are mapped read-only
SLOT_BYTES = 16 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="file size in GiB")
    parser.add_argument("--threads", type=int, default=8, help="staged path: reader threads")
    parser.add_argument("--chunk-mib", type=int, default=256, help="chunked registration: piece size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()
    if args.gib <= 0:  # a size in GiB: a fraction of one is a size
        parser.error(f"--gib must be positive, not {args.gib}")
    require_at_least(parser, args, 1, "threads", "chunk_mib", "rounds")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a folder")

    import torch

    if not torch.cuda.is_available():
        print("skipped: torch sees no CUDA device")
        return 0
    nbytes = int(args.gib * (1 << 30)) // mmap.PAGESIZE * mmap.PAGESIZE
    path = args.dir / f"hpcllm-host-register-{os.getpid()}.bin"
    try:
        write_file(path, nbytes)
        return run(torch, path, nbytes, args)
    finally:
        path.unlink(missing_ok=True)


def write_file(path: Path, nbytes: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for offset in range(0, nbytes, len(block)):
            f.write(block[:min(len(block), nbytes - offset)])


def run(torch, path: Path, nbytes: int, args) -> int:
    device = torch.device("cuda:0")
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    # The ring a staged load gets (threads + 2 slots), allocated before any timer as a spare's would be.
    from hpcllm.store.cuda import CudaCopyEngine, pinned_slots
    from hpcllm.store.ring import StagingRing

    ring = StagingRing(pinned_slots(args.threads + 2, SLOT_BYTES), CudaCopyEngine(device))
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    reference = torch.frombuffer(bytearray(path.read_bytes()[:1 << 20]), dtype=torch.uint8)
    print(f"host_register: {nbytes / 1e9:.2f} GB in {path.parent}, {torch.cuda.get_device_name(device)}, "
          f"torch {torch.__version__}; staged path with {args.threads} threads x 16 MiB slots", flush=True)
    methods = {
        "staged": lambda: staged(path, nbytes, dest, ring, args.threads),
        "register+copy": lambda: register_and_copy(torch, path, nbytes, dest, nbytes),
        "chunked": lambda: register_and_copy(torch, path, nbytes, dest, args.chunk_mib << 20),
        "registered": lambda: registered_copy(torch, path, nbytes, dest),
        "pinned limit": lambda: timed_copy(torch, pinned, dest),
    }
    results: dict[str, list[dict]] = {name: [] for name in methods}
    for round_index in range(args.rounds):
        for name, method in methods.items():
            dest[: 1 << 20].zero_()
            torch.cuda.synchronize()
            result = method()
            if name != "pinned limit" and not torch.equal(dest[: 1 << 20].cpu(), reference):
                raise SystemExit(f"{name}: the GPU copy differs from the file")
            results[name].append(result)
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in result.items() if k != "seconds")
            print(f"  round {round_index + 1} {name:14s} {result['seconds']:7.3f} s "
                  f"{nbytes / result['seconds'] / 1e9:6.1f} GB/s{'  (' + parts + ')' if parts else ''}", flush=True)
    base = statistics.median(r["seconds"] for r in results["staged"])
    print(f"\n{'method':14s} {'median s':>9s} {'GB/s':>6s} {'x staged':>9s}")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        print(f"{name:14s} {seconds:9.3f} {nbytes / seconds / 1e9:6.1f} {base / seconds:8.2f}x")
    return 0


def staged(path: Path, nbytes: int, dest, ring, threads: int) -> dict:
    """The loader's staged path reduced to its copies, with its own pieces: reader threads fill the ring's slots
    with FileReader's buffered preadv (as a load of the DRAM tier's /dev/shm files does), and each filled slot goes to
    the ring's copy engine (on a GPU: CudaCopyEngine's side stream), reused once its fence has signalled."""
    from hpcllm.store.readers import BUFFERED, FileReader
    from hpcllm.store.ring import Copy

    offsets = iter(range(0, nbytes, SLOT_BYTES))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def reader(file: FileReader) -> None:
        try:
            while True:
                with lock:
                    offset = next(offsets, None)
                if offset is None:
                    return
                size = min(SLOT_BYTES, nbytes - offset)
                slot = ring.acquire()
                file.read_into(offset, slot.view[:size], size)
                ring.submit(slot, [Copy(dest, offset, 0, size)])
        except BaseException as error:  # noqa: BLE001 - reported on the main thread
            errors.append(error)

    with FileReader(path, BUFFERED, expected_size=nbytes) as file:
        began = time.perf_counter()
        workers = [threading.Thread(target=reader, args=(file,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        ring.drain()
        seconds = time.perf_counter() - began
    if errors:
        raise errors[0]
    return {"seconds": seconds}


class Mapping:
    """A read-only shared mapping of the file and the address CUDA registers."""

    def __init__(self, torch, path: Path, nbytes: int):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), nbytes, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
        with warnings.catch_warnings():  # torch warns that the buffer is not writable: it is only read
            warnings.simplefilter("ignore")
            self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()

    def close(self) -> None:
        del self.tensor
        self.map.close()


def register(torch, address: int, nbytes: int) -> None:
    error = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, REGISTER_READ_ONLY))
    if error != 0:
        raise SystemExit(f"cudaHostRegister({nbytes} bytes, read-only) failed with CUDA error {error}")


def unregister(torch, address: int) -> None:
    error = int(torch.cuda.cudart().cudaHostUnregister(address))
    if error != 0:
        raise SystemExit(f"cudaHostUnregister failed with CUDA error {error}")


def register_and_copy(torch, path: Path, nbytes: int, dest, chunk: int) -> dict:
    mapping = Mapping(torch, path, nbytes)
    stream = torch.cuda.Stream()
    registering = 0.0
    began = time.perf_counter()
    pieces = [(offset, min(chunk, nbytes - offset)) for offset in range(0, nbytes, chunk)]
    for offset, size in pieces:
        started = time.perf_counter()
        register(torch, mapping.address + offset, size)
        registering += time.perf_counter() - started
        with torch.cuda.stream(stream):
            dest[offset:offset + size].copy_(mapping.tensor[offset:offset + size], non_blocking=True)
    stream.synchronize()
    copied = time.perf_counter()
    for offset, _ in pieces:
        unregister(torch, mapping.address + offset)
    done = time.perf_counter()
    mapping.close()
    return {"seconds": done - began, "register": registering, "unregister": done - copied}


def registered_copy(torch, path: Path, nbytes: int, dest) -> dict:
    mapping = Mapping(torch, path, nbytes)
    started = time.perf_counter()
    register(torch, mapping.address, nbytes)
    registering = time.perf_counter() - started
    result = timed_copy(torch, mapping.tensor, dest)
    unregister(torch, mapping.address)
    mapping.close()
    return {**result, "register (before the timer)": registering}


def timed_copy(torch, source, dest) -> dict:
    torch.cuda.synchronize()
    began = time.perf_counter()
    dest.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - began}


if __name__ == "__main__":
    sys.exit(main())
