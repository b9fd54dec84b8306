"""One fake of an mpi4py communicator for a world of one rank in this process, shared by the tests of the code that
makes collective calls (hpcllm.mpi's broadcast, hpcllm.node.mpiwarm, hpcllm.tp.mpiload). With one rank every
collective gives back the caller's own value or leaves its own buffer as it is."""

from __future__ import annotations


class _Done:
    """A completed nonblocking request."""

    def Wait(self) -> None:
        return None

    def Test(self) -> bool:
        return True


class OneRankWorld:
    """The subset of an mpi4py communicator hpcllm uses, for a world of one rank. `messages` holds the byte size of
    every buffer-API message (Bcast, Ibcast) in order, for tests of what goes in one MPI message."""

    def __init__(self) -> None:
        self.messages: list[int] = []

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, value, root: int = 0):
        return value

    def Bcast(self, buffer, root: int = 0) -> None:
        self.messages.append(memoryview(buffer).nbytes)

    def Ibcast(self, buffer, root: int = 0) -> _Done:
        self.messages.append(memoryview(buffer).nbytes)
        return _Done()

    def gather(self, value, root: int = 0):
        return [value]

    def allgather(self, value):
        return [value]

    def allreduce(self, value, op=None):
        return value
