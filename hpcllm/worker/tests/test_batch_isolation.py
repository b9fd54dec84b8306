"""What one request leaves in a shared engine must not change what a later one gets (test_engine_mixes.py has the
requests that run together): here, KV blocks the prefix cache keeps after their request ended."""

import pytest

from hpcllm.worker.engine import Engine

from .test_lora import PROMPTS, load, merged_greedy, request, write_adapter


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_an_adapter_rewritten_in_its_folder_and_loaded_again_shares_no_cached_prefix_with_its_old_weights(
        model_dirs, tmp_path, model_process):
    """A researcher retrains an adapter into the same folder, unloads it and loads it again: requests with its
    name must get the new weights' output, not the old weights' keys and values the prefix cache still holds for the
    same prompt."""
    model, tokenizer = load(model_dirs)
    folder = tmp_path / "adapter"
    old = write_adapter(folder, model, seed=1)
    prompt = tokenizer(PROMPTS[2])["input_ids"]  # several full KV blocks: a prefix the cache registers
    with Engine(model, tokenizer, model_name="tiny", kv_block_size=4, model_process=model_process) as engine:
        assert engine.load_lora("x", str(folder)) is True
        assert engine.generate(request(prompt_token_ids=prompt, lora="x")).token_ids == merged_greedy(
            model_dirs, old, prompt)
        assert engine.unload_lora("x") == 0
        new = write_adapter(folder, load(model_dirs)[0], seed=2)  # retrained: same folder, other weights
        assert engine.load_lora("x", str(folder)) is True
        expected = merged_greedy(model_dirs, new, prompt)
        assert expected != merged_greedy(model_dirs, old, prompt)  # the test means something
        assert engine.generate(request(prompt_token_ids=prompt, lora="x")).token_ids == expected
