"""Issue 14's "Done when" for a tensor-parallel instance on one node of the real dev Slurm cluster.

`hpcllm gateway` (gunicorn) in front of a real `hpcllm controller` with allocate_on_demand on. A model deployed with
tensor_parallel = 2 (CPU ranks: the fake nodes' GPUs are not real) is cold-started by the first completion: the
controller submits a node-agent job, the agent starts `mpirun -n 2 ... hpcllm worker --tensor-parallel`, rank 0
serves, and the `openai` client's greedy text equals transformers' and the 1-rank instance's (the same checkpoint
deployed again with tensor_parallel = 1). A copy with one corrupt byte in rank 1's slice fails its start with
rank 1 named; no rank stays running. Everything started here is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from e2e_helpers import clean_up_e2e, control_plane, free_port, wait_for, write_e2e_config
from e2e_helpers import admin_status as e2e_admin_status

from hpcllm.checkpoint import read_checkpoint
from hpcllm.checkpoint.converter import convert
from hpcllm.gateway.tests.test_openai_api import hf_greedy

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

SECRET = "tp-e2e-secret"
ADMIN = "tp-e2e-admin"
USER_KEY = "tp-e2e-user"
TAG = os.getpid()
TP_MODEL, ONE_MODEL, BAD_MODEL = f"tiny-tp2-{TAG}", f"tiny-tp1-{TAG}", f"tiny-tp2-bad-{TAG}"
PROMPT = "the cluster"


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


@pytest.fixture
def stack(tiny_llama_dir, tmp_path):
    """(gateway_url, controller_url, root): controller + gunicorn gateway; state under /var/tmp (munge wants
    world-searchable parents). Two CPU slots per node: the two ranks of one instance."""
    root = Path(tempfile.mkdtemp(prefix="hpcllm-tp-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"tp{TAG}",
        gateway_port=gateway_port, user_key=USER_KEY, slurm={"gpus_per_node": 0},
        node={"spare_workers": 0, "worker_stop_timeout_seconds": 10},
        controller={"allocate_on_demand": True, "allocation_start_estimate_seconds": 5.0, "cpu_slots_per_node": 2,
                    "max_allocations": 2})
    convert(tiny_llama_dir, root / "models" / TP_MODEL, progress=False, chunk_size=16384)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(HPCLLM_CONFIG=str(config_path), OMP_NUM_THREADS="1")
    try:
        with control_plane(root, config_path, controller_port, gateway_port, env, ADMIN) as (gateway_url,
                                                                                               controller_url):
            yield gateway_url, controller_url, root
    finally:
        clean_up_e2e(root, tmp_path, f"tp{TAG}")


def deploy(controller_url: str, name: str, source: Path, tensor_parallel: int) -> None:
    resp = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                      json={"name": name, "source": str(source), "gpus": 0, "tensor_parallel": tensor_parallel,
                            "max_instances": 1})
    assert resp.status_code == 201, resp.text


def corrupt_rank_1_slice(checkpoint: Path) -> None:
    """Flip one byte in columns 64..127 of down_proj (rank 1's half at degree 2)."""
    ckpt = read_checkpoint(checkpoint)
    entry = ckpt.tensors["model.layers.1.mlp.down_proj.weight"]  # [64, 128]
    with open(ckpt.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + (5 * 128 + 100) * 4)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def worker_ranks(name: str) -> list[str]:
    """`hpcllm worker --tensor-parallel` processes running on the host (all fake nodes) with an argument naming
    `name` (the model, or the instance id in its URL file)."""
    ranks = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--tensor-parallel" in args and b"mpirun" not in args[0] and any(name.encode() in a for a in args):
            ranks.append(cmdline.parent.name)
    return ranks


def test_a_two_rank_instance_serves_through_the_gateway_like_one_rank_and_a_corrupt_slice_names_rank_1(
        stack, tiny_llama_dir):
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gateway_url, controller_url, root = stack
    models = root / "models"
    shutil.copytree(models / TP_MODEL, models / ONE_MODEL)
    shutil.copytree(models / TP_MODEL, models / BAD_MODEL)
    corrupt_rank_1_slice(models / BAD_MODEL)
    deploy(controller_url, TP_MODEL, models / TP_MODEL, 2)
    deploy(controller_url, ONE_MODEL, models / ONE_MODEL, 1)

    hf_pair = (AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
               AutoTokenizer.from_pretrained(tiny_llama_dir))
    expected_text, expected_finish, _ = hf_greedy(hf_pair, hf_pair[1](PROMPT)["input_ids"], 12)

    def stream(client, model: str) -> tuple[str, str]:
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                                stream=True))
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=300) as client:
        # Cold: the controller allocates a node, its agent starts two ranks under mpirun, rank 0 serves.
        assert stream(client, TP_MODEL) == (expected_text, expected_finish)
        [tp] = [i for i in admin_status(controller_url)["instances"] if i["model"] == TP_MODEL]
        assert tp["state"] == "ready", tp
        assert len(worker_ranks(TP_MODEL)) == 2
        # Warm, and the same checkpoint on one rank: the same text.
        assert stream(client, TP_MODEL) == (expected_text, expected_finish)
        assert stream(client, ONE_MODEL) == (expected_text, expected_finish)

    # The corrupt copy: the start fails on rank 1, named, and no rank of the failed instance is left running (the
    # controller then starts another, as it does for any failed start while there is demand).
    deploy(controller_url, BAD_MODEL, models / BAD_MODEL, 2)
    httpx.get(f"{controller_url}/v1/internal/route", params={"model": BAD_MODEL, "wait": 0},
              headers={"X-Hpcllm-Secret": SECRET}, timeout=30)

    def failure_logged():
        text = (root / "controller.log").read_text()
        return [line for line in text.splitlines() if f"of {BAD_MODEL} failed on" in line]

    [line, *_] = wait_for(failure_logged, 240, f"the controller to log {BAD_MODEL}'s failed start", interval=1)
    assert ("loading the 2-rank shards failed: rank 1: " in line
            and "model.layers.1.mlp.down_proj.weight strip 50/64 along dim 1 is corrupt" in line), line
    failed_instance = line.split("instance ", 1)[1].split()[0]
    assert not worker_ranks(f"{failed_instance}.url")
