"""The CUDA path: pinned staging ring -> async copies on a side stream -> one device buffer per partition."""

from __future__ import annotations

import pytest
import torch

from hpcllm.store.loader import load_model
from hpcllm.store.tests.conftest import ARCHS, evict_from_page_cache, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available (CPU-only torch or no GPU)"),
]

PROMPT = [[1, 5, 9, 33, 7, 100, 250, 3]]


def assert_same_on_gpu(hf, loaded, device="cuda:0"):
    ref = reference(hf).to(device)
    ref_state, state = ref.state_dict(), loaded.model.state_dict()
    assert ref_state.keys() == state.keys()
    for name, tensor in state.items():
        assert tensor.device == torch.device(device), name
        assert tensor.dtype == ref_state[name].dtype and torch.equal(tensor, ref_state[name]), name
    for name, buffer in loaded.model.named_buffers():
        assert buffer.device == torch.device(device), name
        assert torch.equal(buffer, dict(ref.named_buffers())[name]), name
    prompt = torch.tensor(PROMPT, device=device)
    with torch.no_grad():
        assert torch.equal(loaded.model(prompt).logits, ref(prompt).logits)


def assert_views_of_device_buffers(loaded):
    ranges = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in loaded._device_buffers]
    assert len(ranges) == len(loaded.checkpoint.partitions)
    for name, param in loaded.model.named_parameters():
        start = param.data_ptr()
        assert any(lo <= start and start + param.numel() * param.element_size() <= hi for lo, hi in ranges), name


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_load_matches_from_pretrained(models, arch, expected_disk_mode):
    hf, converted = models(arch)
    evict_from_page_cache(converted)
    loaded = load_model(converted, device="cuda:0", tokenizer=False)
    assert loaded.stats.devices == ["cuda:0"] and loaded.stats.reader_mode == expected_disk_mode
    assert_same_on_gpu(hf, loaded)
    assert_views_of_device_buffers(loaded)


def test_model_larger_than_pinned_staging(models):
    hf, converted = models("llama_sharded")
    loaded = load_model(converted, device="cuda", unit_bytes=16 << 10, staging_slots=2, tokenizer=False)
    staging = loaded.stats.staging
    assert staging["slots"] * staging["slot_bytes"] < loaded.stats.bytes / 4
    assert staging["submitted"] == sum(p.num_chunks for p in loaded.checkpoint.partitions)
    assert_same_on_gpu(hf, loaded)


def test_model_loaded_under_a_side_stream_is_ready_on_that_stream(models):
    """The copies run on their own stream from a consuming thread; the caller's (thread-local) current stream must
    still see every weight before its first kernel."""
    hf, converted = models("llama")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loaded = load_model(converted, device="cuda:0", tokenizer=False)
        prompt = torch.tensor(PROMPT, device="cuda:0")
        with torch.no_grad():
            logits = loaded.model(prompt).logits
    side.synchronize()
    ref = reference(hf).to("cuda:0")
    with torch.no_grad():
        assert torch.equal(logits, ref(torch.tensor(PROMPT, device="cuda:0")).logits)


def test_pinned_slots_are_page_aligned_and_locked():
    from hpcllm.store.cuda import pinned_slots

    for size in (1 << 20, (1 << 20) + 4096 * 3):
        for slot in pinned_slots(3, size):
            assert slot.tensor.is_pinned() and slot.tensor.data_ptr() % 4096 == 0
            assert len(slot.view) == size == slot.tensor.numel()


def test_dram_tier_to_gpu(models, dram_tier):
    hf, converted = models("qwen2")
    dram_tier.put(converted, "qwen2")
    loaded = load_model(dram_tier.open("qwen2"), device="cuda:0", tokenizer=False)
    assert loaded.stats.tier == "dram" and not loaded.stats.zero_copy
    assert_same_on_gpu(hf, loaded)


def test_device_map_split_between_cpu_and_gpu(models):
    hf, converted = models("gpt2")  # float32, tied weights
    device_map = {"transformer.h.1": "cpu", "": "cuda:0"}
    loaded = load_model(converted, device=device_map, tokenizer=False)
    model = loaded.model
    assert model.transformer.h[1].mlp.c_fc.weight.device.type == "cpu"
    assert model.transformer.h[0].mlp.c_fc.weight.device.type == "cuda"
    ref = reference(hf)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.cpu(), ref.state_dict()[name]), name
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT, device="cuda:0")).logits
        assert torch.allclose(logits.cpu(), ref(torch.tensor(PROMPT)).logits, atol=1e-4, rtol=1e-4)


def test_flipped_byte_on_gpu_path(copy_checkpoint):
    from hpcllm.checkpoint import ChecksumMismatch
    from hpcllm.store.tests.test_errors import flip_byte_in_tensor

    folder = copy_checkpoint("llama")
    damaged = flip_byte_in_tensor(folder, "model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ChecksumMismatch, match=damaged):
        load_model(folder, device="cuda:0", tokenizer=False)
