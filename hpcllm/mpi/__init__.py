"""mpi4py helpers: a guarded MPI_COMM_WORLD and a pipelined chunked file broadcast (for cache warming).

mpi4py is optional (extra `mpi`); importing this package does not import it, `comm_world()` does.
"""

from hpcllm.mpi.broadcast import DEFAULT_CHUNK_BYTES, BroadcastError, bcast_file_chunks, bcast_file_to
from hpcllm.mpi.comm import MpiUnavailableError, comm_world

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BroadcastError",
    "MpiUnavailableError",
    "bcast_file_chunks",
    "bcast_file_to",
    "comm_world",
]
