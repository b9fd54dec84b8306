"""The issue's "Done when" for the gateway, on the real dev Slurm cluster: `hpcllm gateway` (gunicorn) in front of a
real `hpcllm controller` with allocate_on_demand on, as `make up` runs them.

The first streaming completion for a model with no instance makes the controller submit a node-agent Slurm job;
the agent registers, loads the converted tiny model, and the official `openai` client gets tokens equal to
transformers' greedy `generate`. A chat request then works warm, the gateway's /metrics count the cold start
with its load tier, and the status page shows it all in headless Chromium. Everything this test started (gateway, controller, Slurm jobs) is stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
from e2e_helpers import HPCLLM, clean_up_e2e, control_plane, free_port, write_e2e_config
from e2e_helpers import admin_status as e2e_admin_status
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.checkpoint.converter import convert
from hpcllm.gateway.tests import browser
from hpcllm.gateway.tests.test_openai_api import chat_prompt_ids, hf_greedy

pytestmark = pytest.mark.slurm

SECRET = "cold-e2e-secret"
ADMIN = "cold-e2e-admin"
USER_KEY = "cold-e2e-user"
MODEL = f"tiny-llama-cold{os.getpid()}"  # unique: the jobs the controller submits are named after it
PROMPT = "the cluster"


def write_config(root: Path, controller_port: int, gateway_port: int) -> Path:
    return write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"cold{os.getpid()}",
        gateway_port=gateway_port, user_key=USER_KEY,
        controller={"allocate_on_demand": True, "allocation_start_estimate_seconds": 5.0})


def write_model_file(root: Path, spec: dict) -> Path:
    path = root / f"{spec['name']}.toml"
    path.write_text("".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in spec.items()))
    return path


def admin_status(controller_url: str) -> dict:
    return e2e_admin_status(controller_url, ADMIN)


@pytest.fixture
def stack(tiny_llama_dir, tmp_path):
    """(gateway_url, controller_url, root): a real controller and gunicorn gateway, state under /var/tmp (Slurm
    jobs run the agent as this user and munge wants world-searchable parents, which pytest's tmp_path is not).
    The logs are copied to tmp_path at the end."""
    root = Path(tempfile.mkdtemp(prefix="hpcllm-cold-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_config(root, controller_port, gateway_port)
    convert(tiny_llama_dir, root / "models" / MODEL, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["HPCLLM_CONFIG"] = str(config_path)  # as `make up`: the controller passes it on to the jobs it submits
    def pool_jobs() -> list[str]:  # pool jobs the test may leave, found by name
        return subprocess.run(["squeue", "-h", "-o", "%i", "-n", f"hpcllm-pool-{MODEL}"], capture_output=True,
                              text=True, timeout=30).stdout.split()

    try:
        with control_plane(root, config_path, controller_port, gateway_port, env, ADMIN, pool_jobs) as (
                gateway_url, controller_url):
            yield gateway_url, controller_url, root
    finally:
        clean_up_e2e(root, tmp_path, f"cold{os.getpid()}")


def test_cold_stream_then_warm_chat_and_cold_start_metrics(stack, tiny_llama_dir):
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gateway_url, controller_url, root = stack
    spec = {"name": MODEL, "source": str(root / "models" / MODEL), "gpus": 0}
    # The old demo config's max_model_len = 2048 is refused: the tiny Llama has 512 positions.
    too_long = subprocess.run([HPCLLM, "deploy", str(write_model_file(root, {**spec, "max_model_len": 2048})),
                               "--config", str(root / "hpcllm.toml"), "--url", controller_url],
                              capture_output=True, text=True, timeout=60)
    assert too_long.returncode == 1 and "Traceback" not in too_long.stderr, too_long.stderr
    assert "max_model_len = 2048 is more than the model's context length of 512 tokens" in too_long.stderr
    deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=30, json=spec)
    assert deployed.status_code == 201, deployed.text
    assert deployed.json()["max_model_len"] == 512  # without the key: the model's own
    status = admin_status(controller_url)
    assert not status["instances"] and not status["allocations"], status  # nothing runs yet: a real cold start

    hf_pair = (AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir))
    expected_text, expected_finish, _ = hf_greedy(hf_pair, hf_pair[1](PROMPT)["input_ids"], 12)

    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120) as client:
        # Cold: the controller submits the node-agent job, the agent registers and loads the model, tokens stream.
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                                stream=True))
        # Streamed: text, then the finish (tokens that reach the gateway together share an event: on a busy host
        # a tiny model's 12 tokens can all be in the socket by the time the gateway reads, one event).
        assert len(chunks) >= 2 and chunks[0].choices[0].text and chunks[-1].choices[0].finish_reason
        assert "".join(c.choices[0].text for c in chunks) == expected_text
        assert chunks[-1].choices[0].finish_reason == expected_finish
        allocations = [a for a in admin_status(controller_url)["allocations"] if a["model"] == MODEL]
        assert allocations, "the controller made no Slurm allocation for the cold start"

        # Warm: the chat goes to the instance that is already loaded.
        messages = [{"role": "user", "content": "hello world"}]
        chat_text, chat_finish, chat_tokens = hf_greedy(hf_pair, chat_prompt_ids(hf_pair, messages), 10)
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == chat_text
        assert chat.choices[0].finish_reason == chat_finish
        assert chat.usage.completion_tokens == chat_tokens

        # What most chat clients send: no max_tokens. The gateway fills in 512 - prompt tokens; the worker, started
        # by the agent with the deployed --max-model-len, serves it to the end of the context.
        open_ended = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
        assert open_ended.choices[0].finish_reason == "length"
        assert open_ended.usage.total_tokens == 512
        with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT * 300}])

    cold = [c for c in admin_status(controller_url)["cold_starts"] if c["model"] == MODEL]
    assert len(cold) == 1 and cold[0]["tier"], cold
    tier = cold[0]["tier"]

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{gateway_url}/metrics", timeout=10).text)}
    cold_starts = {s.labels["tier"]: s.value for s in families["hpcllm_cold_starts"].samples
                   if s.name == "hpcllm_cold_starts_total" and s.labels["model_name"] == MODEL}
    assert cold_starts == {tier: 1.0}, cold_starts
    load_counts = {s.labels["tier"]: s.value for s in families["hpcllm_model_load_seconds"].samples
                   if s.name == "hpcllm_model_load_seconds_count"}
    assert load_counts.get(tier) == 1.0, load_counts
    load_sums = {s.labels["tier"]: s.value for s in families["hpcllm_model_load_seconds"].samples
                 if s.name == "hpcllm_model_load_seconds_sum"}
    assert load_sums[tier] > 0

    check_status_page(gateway_url, tier)


def check_status_page(gateway_url: str, tier: str) -> None:
    """The admin's status page, as headless Chromium renders it from this running stack."""
    url = f"{gateway_url}/status?every_ms=600000#key={ADMIN}"
    dom = browser.dump_dom(url)
    assert 'data-state="ok"' in dom, dom[:3000]
    [model] = [browser.cells(r) for r in browser.rows(dom, "models") if f'data-model="{MODEL}"' in r]
    assert model[1:3] == ["hpcllm", "1"] and model[4] == "1 / 1"
    [instance] = [browser.cells(r) for r in browser.rows(dom, "instances") if f"<td>{MODEL}</td>" in r]
    assert instance[3] == "ready" and instance[6] == tier
    node = instance[2]
    [node_row] = [browser.cells(r) for r in browser.rows(dom, "nodes") if f'data-node="{node}"' in r]
    assert node_row[1] == "up" and "sharedfs" in node_row[4]
    [cold] = [browser.cells(r) for r in browser.rows(dom, "cold-starts") if f"<td>{MODEL}</td>" in r]
    assert cold[2:4] == [node, tier] and float(cold[5]) > 0
    [alloc] = [browser.cells(r) for r in browser.rows(dom, "allocations") if f"<td>{MODEL}</td>" in r]
    assert alloc[1] == "running" and node in alloc[3] and alloc[4] != "–"  # walltime left
    browser.screenshot(url, "status-page-dev-cluster.png")
