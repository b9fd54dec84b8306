"""Tensor parallelism: one model instance over N ranks (MPI), each loading and computing its slice of the model.

plan.py     which slice of each tensor a rank holds (from the model's transformers TP plan) and the deploy check
reader.py   read + verify one rank's slices through the store's readers
model.py    build a rank's shard of the model and its collective hooks (mpi4py on CPU, NCCL on GPU)
mpiload.py  MPI-coordinated loading: rank 0 plans, every rank reads its part, failures stop every rank
serve.py    the lead/follower step loop (rank 0 schedules, the others run the same forward)
worker.py   `hpcllm worker --tensor-parallel`: the worker as N MPI ranks
selfcheck.py  `mpirun -n N python -m hpcllm.tp.selfcheck CKPT`: N ranks against the 1-rank model (tests, bench)

See docs/tensor-parallel.md. Importing this package imports neither torch nor mpi4py.
"""
