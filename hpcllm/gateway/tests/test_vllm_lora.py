"""LoRA adapters on a vLLM worker (`hpcllm worker --engine vllm --lora-module NAME=PATH`): vLLM's LoRARequest per
adapter, a request naming one gets the base model with that adapter merged, one naming none the base model; adapters
loaded and unloaded at runtime likewise. Slow: it uses conftest's vllm_server (started with adapter "x"), which
test_vllm_worker.py shares, a vLLM worker taking 30-120 s to start here (test_vllm_worker.py's rule: skipped only
without the vLLM venv)."""

from __future__ import annotations

import pytest

from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.protocol import GenerateRequest
from hpcllm.worker.tests.test_lora import load, merged_greedy, token_ids, write_adapter

from .conftest import SECRET

pytestmark = pytest.mark.slow


@pytest.fixture
def lora_vllm_worker(vllm_server, vllm_lora_x):
    """vllm_server's url; after the test, the shared worker as it started, adapter "x" alone, for
    test_vllm_worker.py. A teardown, so that a test failing on a broken worker reports its own failure and a restore
    that fails reports as this fixture's error."""
    yield vllm_server[0]
    x_folder = str(vllm_lora_x[0])
    with WorkerClient(vllm_server[0], SECRET, read_timeout=120) as worker:
        for other in worker.load_lora_adapter("x", x_folder).lora_adapters.keys() - {"x"}:
            worker.unload_lora_adapter(other)
        restored = worker.load_lora_adapter("x", x_folder)  # the same folder again: nothing to change
    assert not restored.changed and restored.lora_adapters == {"x": x_folder}, restored


def test_a_vllm_worker_serves_adapters_as_hpcllms_engine_does(lora_vllm_worker, vllm_lora_x, small_llama_dir,
                                                              tmp_path):
    model_dirs = {"llama": small_llama_dir}
    model, tokenizer = load(model_dirs)
    x_folder, deltas = vllm_lora_x
    y_deltas = write_adapter(tmp_path / "y", model, seed=8, targets=("q_proj", "v_proj"))
    prompt_ids = tokenizer("hello world")["input_ids"]
    expected = {name: merged_greedy(model_dirs, delta, prompt_ids, max_new_tokens=8)
                for name, delta in (("x", deltas), ("y", y_deltas), (None, None))}
    assert expected["x"] != expected[None] and expected["y"] != expected[None]
    with WorkerClient(lora_vllm_worker, SECRET, read_timeout=120) as worker:
        for name in ("x", None):
            request = GenerateRequest(request_id=f"r-{name}", prompt_token_ids=prompt_ids, max_tokens=8,
                                      temperature=0, ignore_eos=True, lora=name)
            with worker.generate(request) as stream:
                assert token_ids(stream) == expected[name], name
        with pytest.raises(WorkerError, match="'y' is not loaded"):
            worker.generate(GenerateRequest(request_id="r-y", prompt_token_ids=prompt_ids, lora="y"))
        # At runtime (vLLM's add_lora / remove_lora): y loaded, x unloaded and loaded again under its old id.
        assert worker.load_lora_adapter("y", str(tmp_path / "y")).changed
        assert worker.unload_lora_adapter("x").lora_adapters == {"y": str(tmp_path / "y")}
        with pytest.raises(WorkerError, match="'x' is not loaded"):
            worker.generate(GenerateRequest(request_id="r-x-gone", prompt_token_ids=prompt_ids, lora="x"))
        worker.load_lora_adapter("x", str(x_folder))
        for name in ("y", "x"):
            request = GenerateRequest(request_id=f"r-runtime-{name}", prompt_token_ids=prompt_ids, max_tokens=8,
                                      temperature=0, ignore_eos=True, lora=name)
            with worker.generate(request) as stream:
                assert token_ids(stream) == expected[name], name


def test_a_vllm_worker_serves_an_adapter_retrained_in_its_folder_with_its_new_weights(lora_vllm_worker,
                                                                                       small_llama_dir, tmp_path):
    """An adapter unloaded, retrained into the same folder and loaded again under its name: vLLM keys its prefix
    cache by adapter name and path, so the worker salts the new load's blocks (its old weights' keys and values
    would otherwise answer any prompt it had seen)."""
    model_dirs = {"llama": small_llama_dir}
    model, _ = load(model_dirs)
    folder = tmp_path / "z"
    old = write_adapter(folder, model, seed=3)
    prompt_ids = [10 + (index * 37) % 900 for index in range(200)]  # longer than a block (vLLM's CPU one: 128)
    with WorkerClient(lora_vllm_worker, SECRET, read_timeout=120) as worker:

        def greedy(request_id: str) -> list[int]:
            request = GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=8,
                                      temperature=0, ignore_eos=True, lora="z")
            with worker.generate(request) as stream:
                return token_ids(stream)

        assert worker.load_lora_adapter("z", str(folder)).changed
        assert greedy("r-z-old") == merged_greedy(model_dirs, old, prompt_ids, max_new_tokens=8)
        worker.unload_lora_adapter("z")
        new = write_adapter(folder, load(model_dirs)[0], seed=4)  # retrained: same folder, other weights
        expected = merged_greedy(model_dirs, new, prompt_ids, max_new_tokens=8)
        assert expected != merged_greedy(model_dirs, old, prompt_ids, max_new_tokens=8)  # the test means something
        assert worker.load_lora_adapter("z", str(folder)).changed
        assert greedy("r-z-new") == expected
