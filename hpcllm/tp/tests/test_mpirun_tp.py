"""Tensor-parallel loading and serving across real MPI ranks: `mpirun -n 2` runs hpcllm.tp.selfcheck."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from hpcllm.checkpoint import read_checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

MPIRUN_ENV = {
    **os.environ,
    # The test machines run as root; OpenMPI refuses root without both of these.
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}


def _mpirun(ranks: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # mpi_yield_when_idle: ranks sharing the 2 cores must not busy-wait in MPI calls.
    command = ["mpirun", "-n", str(ranks), "--oversubscribe", "--mca", "mpi_yield_when_idle", "1",
               sys.executable, "-m", "hpcllm.tp.selfcheck", *args]
    return subprocess.run(command, env=MPIRUN_ENV, capture_output=True, text=True, timeout=timeout)


def _result(completed: subprocess.CompletedProcess[str]) -> dict:
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(line for line in completed.stdout.splitlines() if line.startswith("result: "))
    return json.loads(line.removeprefix("result: "))


# tp_llama in `make test-long` only: the Llama's 2-rank tokens are checked against transformers' by the worker tests
# below and hpcllm/node/tests/test_tp_instances.py; tp_qwen2 checks the same logits and per-rank reads by default.
@pytest.mark.parametrize("model", [pytest.param("tp_llama", marks=pytest.mark.long), "tp_qwen2"])
def test_two_ranks_match_the_one_rank_model_and_generate_with_a_rank_reading_its_slice_copy(model, request,
                                                                                             tmp_path):
    """The 2-rank model's logits and greedy tokens are the 1-rank model's. Rank 0 has its node's slice copy and a
    view of the checkpoint without data files (so any read of the origin's data would fail); rank 1 has none and
    reads the origin. Each rank reads and verifies only its part."""
    from hpcllm.tp.slicecache import write_slice_copy

    checkpoint = request.getfixturevalue(model)
    copy = tmp_path / "r0"
    copy.mkdir()
    write_slice_copy(checkpoint, 2, 0, copy)
    no_data = tmp_path / "no-data"
    shutil.copytree(checkpoint, no_data)
    for partition in read_checkpoint(no_data).partitions:
        partition.path.unlink()

    result = _result(_mpirun(2, str(checkpoint), "--path-of-rank", f"0={no_data}", "--slice-copy-of-rank",
                             f"0={copy}", "--generate", "12"))

    assert result["ranks"] == 2
    assert result["max_abs_logit_diff"] < 1e-5
    assert result["tp_tokens"] == result["reference_tokens"] and len(result["tp_tokens"]) == 12
    total = read_checkpoint(checkpoint).total_bytes
    for stats in result["stats"]:
        assert 0 < stats["bytes_read"] < total and stats["strips_verified"] > 0, stats
    rank0, rank1 = result["stats"]
    assert rank0["slice_copy"] == str(copy) and rank0["reads"] == rank0["cache_reads"] > 0, rank0
    assert rank1["slice_copy"] is None and rank1["cache_reads"] == 0, rank1


def _damaged_copy(tp_llama, tmp_path, name: str):
    copy = tmp_path / name
    shutil.copytree(tp_llama, copy)
    return copy


@pytest.mark.long  # by default hpcllm/node/tests/test_tp_instances.py's test of this corruption through the agent
def test_a_corrupt_slice_on_rank_1_fails_every_rank_naming_rank_1(tp_llama, tmp_path):
    broken = _damaged_copy(tp_llama, tmp_path, "corrupt")
    ckpt = read_checkpoint(broken)
    entry = ckpt.tensors["model.layers.1.mlp.down_proj.weight"]  # [64, 128]: rank 1 holds columns 64..127
    with open(ckpt.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + (5 * 128 + 100) * 4)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))

    completed = _mpirun(2, str(tp_llama), "--path-of-rank", f"1={broken}", "--no-reference", timeout=120)

    assert completed.returncode != 0
    cause = "rank 1: " + str(ckpt.partitions[0].path) + ": tensor model.layers.1.mlp.down_proj.weight strip 50/64 " \
                                                        "along dim 1 is corrupt"
    assert "error: rank 0 on" in completed.stderr and "error: rank 1 on" in completed.stderr
    assert completed.stderr.count(cause) == 2, completed.stderr  # both ranks name rank 1 and the cause
    assert "result:" not in completed.stdout


def test_a_missing_data_file_on_rank_1_is_named(tp_llama, tmp_path):
    broken = _damaged_copy(tp_llama, tmp_path, "missing")
    (broken / "data-00000.h5").unlink()

    completed = _mpirun(2, str(tp_llama), "--path-of-rank", f"1={broken}", "--no-reference")

    assert completed.returncode != 0
    assert completed.stderr.count(f"rank 1: {broken / 'data-00000.h5'}: data file is missing") == 2, \
        completed.stderr


def test_rank_1_out_of_memory_is_named(wide_llama):
    completed = _mpirun(2, str(wide_llama), "--memory-limit-rank", "1", "--memory-limit-mb", "24", "--no-reference")

    assert completed.returncode != 0
    assert completed.stderr.count("rank 1: out of memory (Unable to allocate") == 2, completed.stderr


def test_a_rank_stuck_in_a_read_is_named_and_the_job_aborted(tp_llama, tmp_path):
    stuck = _damaged_copy(tp_llama, tmp_path, "stuck")
    (stuck / "data-00000.h5").unlink()
    os.mkfifo(stuck / "data-00000.h5")  # opening it blocks forever, like a hung network filesystem

    # 1 s: the wait starts once both ranks took the plan (past their imports), and rank 1 never reports
    completed = _mpirun(2, str(tp_llama), "--path-of-rank", f"1={stuck}", "--timeout", "1", "--no-reference",
                        timeout=150)

    assert completed.returncode != 0
    assert "rank 0: rank(s) 1 did not report within 1 s while loading the model shard" in \
        completed.stdout + completed.stderr
    # Rank 1 blocks forever opening the FIFO: the job ending at all means rank 0's MPI_Abort killed it. (OpenMPI's
    # own "MPI_ABORT was invoked" help text is not asserted: under load its show_help fails with "Out of resource".)


# By default hpcllm/node/tests/test_tp_instances.py's test_a_two_rank_instance_serves_greedy_tokens_live_migrates_a_
# stream_and_stops_every_rank checks the same through the node agent: chunked prefill, a second and concurrent
# requests, the stop.
@pytest.mark.long
def test_the_worker_serves_a_two_rank_instance_with_rank_0_as_its_endpoint(tp_llama, tmp_path):
    """`mpirun -n 2 hpcllm worker --tensor-parallel`: the HTTP API on rank 0 gives transformers' greedy tokens, also
    for a prompt prefilled over several steps that keep no logits (the output projection's all-gather of zero rows);
    SIGTERM ends every rank (the follower by the lead's stop step)."""
    import signal

    import torch

    from hpcllm.store import load_model
    from hpcllm.worker.protocol import GenerateRequest, TokenLine

    process = start_tp_worker(tp_llama, tmp_path, "[worker]\nprefill_chunk_tokens = 4\n")  # two steps, no logits
    try:
        client = ready_client(process, tmp_path)

        loaded = load_model(tp_llama)
        prompt_ids = loaded.tokenizer("hello world, this")["input_ids"]
        ids = torch.tensor([prompt_ids])
        expected = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=12)[0, len(prompt_ids):].tolist()
        def greedy(request_id: str) -> list[int]:
            with client.generate(GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=12,
                                                 temperature=0)) as stream:
                return [line.token_id for line in stream if isinstance(line, TokenLine)]

        for request_id in ("first", "second"):  # the second reuses the ranks after the first's KV blocks were freed
            assert greedy(request_id) == expected
        # Concurrent requests share each step's batched forward on every rank (the batched engine's StepBatch).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(greedy, ("a", "b", "c"))) == [expected] * 3
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert "tensor-parallel rank 1 on" in output and "rank 1: the lead stopped after" in output, output
    assert "Traceback" not in output


def test_with_a_stop_signal_every_rank_survives_sigterm_and_the_stop_signal_ends_them_all(tp_llama, tmp_path):
    """`--stop-signal USR2` (how the node agent runs ranks under an srun step, where Slurm's preemption may SIGTERM
    every task at once): SIGTERM to every rank leaves the instance serving; SIGUSR2 to every rank (what srun
    forwards) stops the lead, whose stop step ends the follower."""
    import signal

    from hpcllm.node.workers import descendants
    from hpcllm.worker.protocol import GenerateRequest, TokenLine

    process = start_tp_worker(tp_llama, tmp_path, "", "--stop-signal", "USR2")
    try:
        client = ready_client(process, tmp_path)
        ranks = [pid for pid in descendants(process.pid)
                 if b"--tensor-parallel" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(ranks) == 2
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        # A step both ranks complete after kill() returned: both got the SIGTERM and still serve.
        request = GenerateRequest(request_id="after-sigterm", prompt="hello", max_tokens=1, ignore_eos=True,
                                  temperature=0)
        with client.generate(request) as stream:
            assert any(isinstance(line, TokenLine) for line in stream), "no token after SIGTERM"
        assert process.poll() is None
        for pid in ranks:
            os.kill(pid, signal.SIGUSR2)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "signal 12: shutting down" in output and "rank 1: the lead stopped after" in output, output
    assert "Traceback" not in output


def test_a_broken_tokenizer_on_rank_0_fails_every_rank_instead_of_hanging(tp_llama, tmp_path):
    """Rank 0 loaded the tokenizer after the last status exchange: a broken tokenizer.json raised on rank 0 alone
    ('Expecting property name ...', no file named) while rank 1 waited in the final gather, so the job never ended."""
    broken = _damaged_copy(tp_llama, tmp_path, "tokenizer")
    (broken / "tokenizer.json").write_text("{broken")

    completed = _mpirun(2, str(broken), "--no-reference", timeout=150)

    assert completed.returncode != 0
    assert "rank 1 on" in completed.stderr and "tokenizer files of" in completed.stderr, completed.stderr


def test_a_checkpoint_without_tokenizer_files_is_named_by_the_check(tp_llama, tmp_path):
    """The self check tokenizes its prompt on rank 0: a checkpoint converted without tokenizer files ended in
    "TypeError: 'NoneType' object is not callable" and a traceback instead of saying what is missing."""
    bare = _damaged_copy(tp_llama, tmp_path, "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()

    completed = _mpirun(2, str(bare), "--no-reference", timeout=150)

    assert completed.returncode != 0
    assert "error: rank 0 on" in completed.stderr, completed.stderr
    assert f"{bare} has no tokenizer files: the check tokenizes its --prompt" in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_rank_out_of_memory_mid_request_ends_every_rank_naming_it(wide_llama):
    """Rank 1 loads its shard but cannot allocate a long prompt's activations: it raised and exited while rank 0
    waited in the step's all-reduce, so the instance hung forever. Now it names itself and aborts every rank."""
    completed = _mpirun(2, str(wide_llama), "--no-reference", "--generate", "1", "--memory-limit-rank", "1",
                        "--memory-limit-mb", "200", "--prompt", "word " * 3000, timeout=150)

    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "rank 1: the forward step failed" in output and "allocate" in output, output


def test_a_checkpoint_missing_on_one_rank_ends_every_rank_naming_it(tp_llama, tmp_path):
    """A rank whose node lacks the checkpoint (the shared filesystem not mounted there) raised alone while rank 0
    waited in the load's first broadcast: the instance never became ready and never ended. Every rank now names it."""
    worker = [sys.executable, "-m", "hpcllm.cli.main", "worker", "--tensor-parallel", "--url-file",
              str(tmp_path / "url"), "--model"]
    command = ["mpirun", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1", "-n", "1", *worker, str(tp_llama),
               ":", "-n", "1", *worker, str(tmp_path / "not-mounted")]

    completed = subprocess.run(command, env={**MPIRUN_ENV, "HPCLLM_SHARED_SECRET": "tp-secret"},
                               capture_output=True, text=True, timeout=120)

    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert f"rank 0: model checkpoint does not exist on rank 1 ({tmp_path / 'not-mounted'})" in output, output


def test_a_lead_that_refuses_its_config_ends_every_rank(tp_llama, tmp_path):
    """`[worker] cuda_graphs = true` on a CPU instance: the lead refused it and exited while rank 1 waited in the
    load's collectives, so mpirun never ended. The lead's error line stays and every rank ends."""
    config = tmp_path / "worker.toml"
    config.write_text("[worker]\ncuda_graphs = true\n")
    command = ["mpirun", "-n", "2", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1", sys.executable, "-m",
               "hpcllm.cli.main", "worker", "--model", str(tp_llama), "--tensor-parallel", "--url-file",
               str(tmp_path / "url")]

    completed = subprocess.run(command, env={**MPIRUN_ENV, "HPCLLM_SHARED_SECRET": "tp-secret",
                                             "HPCLLM_CONFIG": str(config)}, capture_output=True, text=True,
                               timeout=120)

    assert completed.returncode != 0
    assert "error: [worker] cuda_graphs needs a GPU worker" in completed.stdout + completed.stderr


def test_a_lead_stopped_during_the_load_ends_every_rank(tp_llama, tmp_path):
    """A stop signal to the lead while rank 1 still loads (stuck opening a FIFO): the lead's server returned
    normally before any engine existed, so no stop step went out and rank 1 and mpirun waited forever. The lead
    now aborts every rank."""
    import signal

    from hpcllm.node.workers import descendants

    stuck = _damaged_copy(tp_llama, tmp_path, "stuck")
    (stuck / "data-00000.h5").unlink()
    os.mkfifo(stuck / "data-00000.h5")  # rank 1's load blocks forever opening it: the instance never loads
    url_file = tmp_path / "url"
    worker = [sys.executable, "-m", "hpcllm.cli.main", "worker", "--tensor-parallel", "--url-file", str(url_file),
              "--model"]
    command = ["mpirun", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1", "-n", "1", *worker, str(tp_llama),
               ":", "-n", "1", *worker, str(stuck)]
    process = subprocess.Popen(command, env={**MPIRUN_ENV, "HPCLLM_SHARED_SECRET": "tp-secret"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not url_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the lead publishes its URL before it loads
        assert url_file.exists(), process.stdout.read() if process.poll() is not None else "no url file"
        lead = next(pid for pid in descendants(process.pid)
                    if f"{tp_llama}\0".encode() in open(f"/proc/{pid}/cmdline", "rb").read())
        os.kill(lead, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert "error: the lead stopped before the instance was loaded; aborting every rank" in output, output


@pytest.mark.long  # ~50 s: the hung-step timeout, then the abort (make test-long)
def test_a_step_hung_on_a_follower_ends_every_rank(tp_llama, tmp_path):
    """Rank 1 stopped (SIGSTOP: a hung device or collective) while a request runs: the lead's step waits in its
    all-reduce past [worker] step_timeout_seconds, the engine dies and its shutdown finds the engine thread still
    stuck there, so it aborts every rank instead of sending a stop step behind the hung one."""
    import signal

    from hpcllm.node.workers import descendants
    from hpcllm.worker.client import WorkerError
    from hpcllm.worker.protocol import GenerateRequest

    process = start_tp_worker(tp_llama, tmp_path, "[worker]\nstep_timeout_seconds = 3\n")
    try:
        client = ready_client(process, tmp_path)
        follower = next(pid for pid in descendants(process.pid)
                        if b"OMPI_COMM_WORLD_RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read())
        os.kill(follower, signal.SIGSTOP)
        try:
            with client.generate(GenerateRequest(request_id="hung", prompt_token_ids=[5, 17, 300], max_tokens=4,
                                                 temperature=0)) as stream:
                ended = list(stream)[-1]
        except WorkerError as exc:  # the abort ended the job, and the connection with it, mid-stream
            ended = exc
        # never answered as if served: the engine's error line, or the connection gone with the job
        assert isinstance(ended, WorkerError) or ended.finish_reason == "error", ended
        output, _ = process.communicate(timeout=150)
    finally:
        if process.poll() is None:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode != 0
    assert "the engine thread is stuck in a tensor-parallel step; aborting every rank" in output, output


def start_tp_worker(checkpoint, tmp_path, config_text: str, *args: str) -> subprocess.Popen:
    """`mpirun -n 2 hpcllm worker --tensor-parallel [args]` on checkpoint with this config, writing its URL to
    tmp_path/worker.url (its output: the process's stdout)."""
    config = tmp_path / "worker.toml"
    config.write_text(config_text)
    command = ["mpirun", "-n", "2", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1", sys.executable, "-m",
               "hpcllm.cli.main", "worker", "--model", str(checkpoint), "--tensor-parallel", "--url-file",
               str(tmp_path / "worker.url"), *args]
    env = {**MPIRUN_ENV, "HPCLLM_SHARED_SECRET": "tp-secret", "HPCLLM_CONFIG": str(config)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ready_client(process: subprocess.Popen, tmp_path):
    """A WorkerClient of the worker start_tp_worker started, once it answers ready (180 s at most)."""
    from hpcllm.worker.client import WorkerClient

    url_file, deadline = tmp_path / "worker.url", time.monotonic() + 180
    while not url_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert url_file.exists(), process.stdout.read() if process.poll() is not None else "no url file"
    client = WorkerClient(url_file.read_text().strip(), "tp-secret")
    while client.ready() is None and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.3)
    return client


def test_two_instances_on_one_node_each_rendezvous_on_their_own_port(tmp_path):
    """The GPU path's torch.distributed rendezvous (init_torch_distributed; gloo here, NCCL on GPUs) listened on
    one fixed port: a second tensor-parallel instance on a node where one runs failed at start with EADDRINUSE
    (its ranks could even reach the first instance's store). This process is the first instance (one rank, its
    store open), an `mpirun -n 2` the second; each of its ranks writes the sum it got into tmp_path."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from hpcllm.tp.model import init_torch_distributed

    rank_script = ("import sys, torch; from mpi4py import MPI; from hpcllm.tp.model import init_torch_distributed; "
                   "c = init_torch_distributed(MPI.COMM_WORLD, 'gloo'); t = torch.full((3,), c.rank + 1.0); "
                   "c.allreduce_sum_(t); open(f'{sys.argv[1]}/rank{c.rank}', 'w').write(str(t.tolist())); "
                   # left to interpreter exit, gloo's thread can drop a tensor without the GIL: abort (rc 134)
                   "torch.distributed.destroy_process_group()")
    first = init_torch_distributed(MPI.COMM_SELF, "gloo")
    try:
        second = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1",
                                 sys.executable, "-c", rank_script, str(tmp_path)],
                                env=MPIRUN_ENV, capture_output=True, text=True, timeout=150)
        mine = first.allreduce_sum_(torch.full((3,), 5.0))
    finally:
        dist.destroy_process_group()

    assert second.returncode == 0, second.stdout + second.stderr
    sums = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert sums == {"rank0": "[3.0, 3.0, 3.0]", "rank1": "[3.0, 3.0, 3.0]"}, second.stdout + second.stderr
    assert mine.tolist() == [5.0, 5.0, 5.0]


def test_rendezvous_waits_for_late_ranks_as_long_as_the_process_group_does():
    """The rendezvous store of init_torch_distributed had torch's TCPStore default of 5 minutes: a rank that got
    there later (a node still loading, a slow start) failed the instance's start, where the tcp:// rendezvous it
    replaced waited the process group's default (30 minutes for gloo, 10 for NCCL)."""
    import torch.distributed as dist
    from mpi4py import MPI
    from torch.distributed import constants

    from hpcllm.tp.model import init_torch_distributed

    init_torch_distributed(MPI.COMM_SELF, "gloo")
    try:
        store_timeout = dist.distributed_c10d._get_default_store().timeout
    finally:
        dist.destroy_process_group()
    assert store_timeout == constants.default_pg_timeout
