"""Tier probes (small sizes) and GPU discovery from what Slurm gives a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from hpcllm.config import parse_config
from hpcllm.node.agent import NodeAgent
from hpcllm.node.cache import CacheManager
from hpcllm.node.gpus import GpuInventory, detect_gpus
from hpcllm.node.probes import measure_tiers, probe_sharedfs
from hpcllm.slurm.base import drain_signal

MiB = 1 << 20


def test_measure_tiers_reports_positive_bandwidths_and_leaves_no_probe_file(tmp_path):
    m = measure_tiers(tmp_path / "nvme", tmp_path / "models", 4 * MiB, 4 * MiB, gpu_count=0)
    assert m.nvme.read_gbps > 0 and m.nvme.bytes == 4 * MiB
    assert m.nvme.mode in ("odirect", "buffered")
    assert m.nvme.mode == "odirect" or m.nvme.note  # a fallback always says why
    assert m.sharedfs.read_gbps > 0 and m.sharedfs.mode == "buffered"
    assert m.dram.read_gbps > 0 and m.dram.mode == "memcpy"
    assert m.h2d is None  # no GPU asked for
    assert list((tmp_path / "nvme").iterdir()) == [] and list((tmp_path / "models").iterdir()) == []


def test_the_dram_rate_leaves_out_the_time_other_processes_held_the_cpu():
    """A node agent probing beside busy processes (others' jobs, the other agents of its job) reports what its memory
    copies at, not what the scheduler gave it: here the probing process runs in short slices between stops (as if
    other processes held its CPU), and no pass may count a stop."""
    stopped_s, running_s = 0.05, 0.002
    script = ("import sys; from hpcllm.node.probes import memcpy_bandwidth\n"
              "print('ready', flush=True); sys.stdin.readline()\n"
              "print(memcpy_bandwidth(64 << 20).seconds, flush=True)")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        child.stdin.write("go\n")
        child.stdin.flush()
        while child.poll() is None:  # the buffers' first touch and the passes all run in these slices
            os.kill(child.pid, signal.SIGSTOP)
            time.sleep(stopped_s)
            os.kill(child.pid, signal.SIGCONT)
            time.sleep(running_s)
        pass_seconds = float(child.stdout.read())
    finally:
        child.kill()
        child.wait()
    assert pass_seconds < stopped_s, f"the best pass took {pass_seconds} s: it counted a stop of {stopped_s} s"


def test_read_only_models_folder_is_measured_by_reading_an_existing_file(tmp_path, monkeypatch):
    import errno

    from hpcllm.node import probes

    models = tmp_path / "models"
    models.mkdir()
    (models / "data.bin").write_bytes(os.urandom(2 * MiB))

    def read_only(path, size):  # what a read-only mount answers (root ignores chmod, so simulate the mount)
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(probes, "_write_probe_file", read_only)
    result = probe_sharedfs(models, 4 * MiB)
    assert result.read_gbps > 0 and result.bytes == 2 * MiB and "not writable" in result.note


def test_unreadable_shared_fs_is_left_out_rather_than_invented(tmp_path):
    missing_parent = tmp_path / "file"
    missing_parent.write_text("x")
    assert probe_sharedfs(missing_parent / "models", MiB) is None


@pytest.mark.parametrize("env, names, source", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ("0", "1"), "CUDA_VISIBLE_DEVICES"),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_JOB_GPUS": "2,3"}, ("2", "3"), "CUDA_VISIBLE_DEVICES"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5d1c,GPU-77aa"}, ("GPU-5d1c", "GPU-77aa"), "CUDA_VISIBLE_DEVICES"),
    ({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, ("0",), "CUDA_VISIBLE_DEVICES"),  # CUDA stops at the invalid index
    ({"SLURM_JOB_GPUS": "5"}, ("5",), "SLURM_JOB_GPUS"),
    ({"SLURM_GPUS_ON_NODE": "3"}, ("0", "1", "2"), "SLURM_GPUS_ON_NODE"),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, (), "none"),
    ({"CUDA_VISIBLE_DEVICES": ""}, (), "none"),
    ({"SLURM_JOB_ID": "42"}, (), "slurm-job"),
    ({}, (), "none"),
])
def test_gpus_from_slurm_environment(env, names, source):
    inv = detect_gpus(env, use_nvml=False)
    assert (inv.names, inv.source, inv.count) == (names, source, len(names))


@pytest.mark.parametrize("env, names, source", [
    ({}, ("0", "1", "2", "3", "4", "5", "6", "7"), "nvml"),  # outside Slurm: every GPU of the machine
    ({"CUDA_VISIBLE_DEVICES": "6,7"}, ("6", "7"), "nvml"),  # NVML ignores CUDA_VISIBLE_DEVICES: narrow by it
    ({"CUDA_VISIBLE_DEVICES": ""}, (), "none"),  # hidden on purpose: none, though NVML lists 8
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_JOB_ID": "7"}, (), "none"),
    ({"SLURM_JOB_ID": "7"}, (), "slurm-job"),  # a job without GPUs on a GPU node: the 8 are other jobs'
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,5"}, ("2", "5"), "SLURM_JOB_GPUS"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7,8,9"}, tuple(str(i) for i in range(8)), "nvml"),
    # MIG slices: NVML counts the 8 physical GPUs, not their slices; each slice is one device to CUDA
    ({"CUDA_VISIBLE_DEVICES": ",".join(f"MIG-{i:04x}" for i in range(14))}, tuple(f"MIG-{i:04x}" for i in range(14)),
     "CUDA_VISIBLE_DEVICES"),
])
def test_nvml_counts_but_the_job_decides(env, names, source, monkeypatch):
    """A node with 8 GPUs as NVML sees it (nvidia-ml-py's pynvml module, faked: no driver here)."""
    import sys
    import types

    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    calls = []
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlDeviceGetCount = lambda: 8
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    inv = detect_gpus(env)
    assert (inv.names, inv.source) == (names, source)
    assert calls == ["init", "shutdown"]


def test_a_node_without_the_nvidia_driver_falls_back_to_slurm(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})

    def no_library():
        raise fake.NVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = no_library
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inv = detect_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_ID": "3"})
    assert (inv.names, inv.source) == (("0", "1"), "CUDA_VISIBLE_DEVICES")


def test_a_worker_sees_only_its_gpus():
    inv = detect_gpus({"CUDA_VISIBLE_DEVICES": "4,6,7"}, use_nvml=False)
    assert inv.visible_devices([0, 2]) == "4,7"


def test_without_cuda_the_h2d_probe_reports_nothing_and_a_broken_probe_is_a_note(tmp_path, monkeypatch):
    from hpcllm.node import probes

    # Here torch is the CPU build: the child process finds no CUDA and the figure is left out, not invented.
    m = measure_tiers(tmp_path / "nvme", tmp_path / "models", MiB, MiB, gpu_count=2, gpu_device="1")
    assert m.h2d is None and not [n for n in m.notes if "host-to-device" in n]

    def crashing(size, passes=3, device=None, timeout_s=0, preexec_fn=None):
        raise RuntimeError("the host-to-device probe process exited with status -11: Segmentation fault")

    monkeypatch.setattr(probes, "h2d_bandwidth", crashing)
    m = measure_tiers(tmp_path / "nvme", tmp_path / "models", MiB, MiB, gpu_count=2)
    assert m.h2d is None and any("status -11" in n for n in m.notes)


@pytest.mark.gpu
def test_host_to_device_bandwidth_on_a_real_gpu():
    """Needs a GPU machine. The probe reports a plausible figure for the GPU it was given, and the calling process
    (the agent) neither imports torch nor holds a CUDA context afterwards (checked in a fresh process)."""
    import json
    import subprocess
    import sys

    import torch

    agent_like = ("import json, sys; from hpcllm.node.probes import h2d_bandwidth; r = h2d_bandwidth(64 << 20); "
                  "print(json.dumps([r and r.__dict__, 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", agent_like], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, imported_torch = json.loads(done.stdout.strip().splitlines()[-1])
    assert first is not None and first["mode"] == "pinned" and first["bytes"] == 64 * MiB
    assert 0.5 < first["read_gbps"] < 1000, first  # PCIe 3 x16 ~12 GB/s ... NVLink-C2C ~450 GB/s
    assert not imported_torch

    from hpcllm.node.probes import h2d_bandwidth

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    last_gpu = visible.split(",")[-1] if visible else str(torch.cuda.device_count() - 1)
    last = h2d_bandwidth(16 * MiB, device=last_gpu)
    assert last is not None and last.read_gbps > 0.5


@pytest.mark.gpu
def test_gpu_discovery_agrees_with_cuda_on_a_real_gpu():
    """Needs a GPU machine (and nvidia-ml-py, the `gpu` extra): outside Slurm NVML counts what CUDA sees."""
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (pip install -e '.[gpu]') for NVML discovery")
    import torch

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    inv = detect_gpus(env)
    assert inv.source == "nvml" and inv.count >= torch.cuda.device_count() >= 1
    narrowed = detect_gpus({**env, "CUDA_VISIBLE_DEVICES": "0"})
    assert narrowed.names == ("0",)


def test_the_agents_background_sweep_measures_each_tier_and_hands_the_result_to_its_workers(tmp_path):
    import json

    from hpcllm.node.tests.test_agent import make_agent
    from hpcllm.store.tuning import INTO_POOL, TUNING_ENV, ReadTuning, choose_read_plan

    (tmp_path / "models").mkdir()
    agent = make_agent(tmp_path)
    agent.read_sweep_quiet_seconds = 0.0
    try:
        agent.measure()  # the real probes, 1 MiB files
        agent.prepare_read_settings()
        env = agent.workers._environment([])
        assert not os.path.exists(env[TUNING_ENV])  # workers started before the sweep ends use the tier defaults
        sweep = agent.start_background_measurements()  # the real sweep, in its thread
        assert sweep.done.wait(120)
        tuning = agent.read_tuning
        assert set(tuning.tiers) == {"disk", "sharedfs"}
        assert {"buffered", "mmap"} <= set(tuning.tiers["disk"].best)  # odirect too where the disk takes it
        assert set(tuning.tiers["sharedfs"].best) == {"buffered"}
        assert tuning.tiers["disk"].device == os.stat(agent.nvme_dir).st_dev
        saved = ReadTuning.load(env[TUNING_ENV])  # the path the workers were given before the file existed
        assert saved == tuning and json.loads(open(env[TUNING_ENV]).read())["tiers"]
        # a checkpoint in the NVMe folder is read with the probe's fastest settings of the modes its target takes:
        # O_DIRECT into fresh memory (mapped where the disk refuses O_DIRECT); into a worker's pre-faulted pool the
        # faster of O_DIRECT and buffered as measured (which one wins varies with the disk and the machine's load)
        disk = saved.tiers["disk"]
        fresh = ("odirect",) if "odirect" in disk.best else ("mmap",)
        for prefaulted, modes in ((False, fresh), (True, INTO_POOL)):
            plan = choose_read_plan(saved, "disk", "odirect", 2, 16 * MiB, host_target=True,
                                    checkpoint_device=os.stat(agent.nvme_dir).st_dev, prefaulted=prefaulted)
            fastest = disk.fastest(modes)
            assert (plan.mode, plan.threads, plan.block_bytes) == (fastest.mode, fastest.threads, fastest.block_bytes)
        # no probe file left; the NVMe folder keeps the result for the next agents on this node
        assert sorted(p.name for p in agent.nvme_dir.iterdir()) == [".hpcllm-read-tuning.json",
                                                                    ".hpcllm-tier-probe.json"]
        assert list((tmp_path / "models").iterdir()) == []
    finally:
        agent.workers.close()


def test_the_start_up_probes_do_not_sweep(tmp_path, monkeypatch):
    from hpcllm.store import tuning

    monkeypatch.setattr(tuning, "sweep_read", lambda *a, **k: pytest.fail("measure_tiers swept"))
    m = measure_tiers(tmp_path / "nvme", tmp_path / "models", MiB, MiB)
    assert m.nvme.read_gbps > 0 and m.sharedfs.read_gbps > 0


def test_a_drain_signal_does_not_end_the_host_to_device_probe_mid_measure(tmp_path, monkeypatch):
    """Slurm's `scancel --signal` reaches every process of the step: the agent's probe child must ignore the drain
    signal as its workers do, or a drain during the start-up probes kills it and the agent notes a failed probe.
    The child holds in its start-up (a sitecustomize on PYTHONPATH: only children read it) until the signal was
    sent."""
    pid_file, go_file = tmp_path / "child.pid", tmp_path / "go"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, time\n"
        f"open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"
        "deadline = time.monotonic() + 120\n"
        f"while not os.path.exists({str(go_file)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    config = parse_config({"paths": {"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "models")},
                           "cluster": {"shared_secret": "s" * 32},
                           "node": {"nvme_dir": str(tmp_path / "nvme-%n"), "probe_bytes": MiB,
                                    "memcpy_probe_bytes": MiB}})
    agent = NodeAgent(config, cache=CacheManager(tmp_path / "nvme", 10**8, 10**8, "probe-test",
                                                 dram_root=tmp_path / "shm"),
                      gpus=GpuInventory(("0",), "test"))
    with ThreadPoolExecutor(1) as pool:
        measuring = pool.submit(agent.measure)
        deadline = time.monotonic() + 120
        while not pid_file.exists() and not measuring.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if measuring.done():
            measuring.result()  # its exception, rather than the note below
        assert pid_file.exists(), "the probe child never started"
        os.kill(int(pid_file.read_text()), drain_signal(config))
        go_file.touch()
        measured = measuring.result(timeout=300)
    assert not [note for note in measured.notes if "host-to-device" in note], measured.notes
