"""The paged runner's CPU fast path (fastpath.py): fused q/k/v and gate/up projections, oneDNN-packed linears.

What a user would notice if it went wrong: other tokens than `generate` on the checkpoint, a model that no longer
runs (cache path, biases, tied embeddings), or a model holding its projection weights twice."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from hpcllm.worker import fastpath
from hpcllm.worker.engine import Engine
from hpcllm.worker.protocol import GenerateRequest

from .conftest import ARCHS

PROMPTS = ["hello world, this", "the", "🙂 日本語 テスト and a longer prompt"]


def fresh(model_dirs, arch):
    return AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()


def greedy(model, prompt_ids, new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=new_tokens)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_family_projections_are_fused_packed_and_the_originals_dropped(arch, model_dirs, load_pair,
                                                                             reference_model):
    model = fresh(model_dirs, arch)
    _, tokenizer = load_pair(arch)
    layers = model.model.layers
    originals = [weakref.ref(getattr(layer.self_attn, name).weight) for layer in layers
                 for name in ("q_proj", "k_proj", "v_proj")]
    originals += [weakref.ref(getattr(layer.mlp, name).weight) for layer in layers for name in ("gate_proj", "up_proj")]
    engine = Engine(model, tokenizer, batching="paged").start()
    try:
        done = fastpath.FastPath(fused_attention=len(layers), fused_mlp=len(layers),
                                 packed_linear=4 * len(layers) + 1,  # qkv, o, gate_up, down per layer; lm_head
                                 lean_step="on")
        assert engine.runner.fast_path == done
        attention, mlp = layers[0].self_attn, layers[0].mlp
        assert not hasattr(attention, "q_proj") and not hasattr(mlp, "gate_proj")
        assert attention.qkv_proj.out_features == sum(attention.qkv_sizes)
        assert (attention.qkv_proj.bias is not None) == (arch == "qwen2")  # Qwen2's q/k/v biases are fused too
        gc.collect()
        assert all(ref() is None for ref in originals)  # the model does not hold the projections twice
        assert all(not hasattr(m, "weight") for m in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj))

        for number, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt)["input_ids"]
            result = engine.generate(GenerateRequest(request_id=f"f-{arch}-{number}", prompt_token_ids=ids,
                                                     max_tokens=30, temperature=0, ignore_eos=True))
            assert result.token_ids == greedy(reference_model(arch), ids, 30)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_prepared_model_computes_what_the_checkpoint_does(arch, model_dirs, load_pair, reference_model):
    """Also outside the engine (transformers' own cache path: generate, the TP reference steps)."""
    model = fresh(model_dirs, arch)
    _, tokenizer = load_pair(arch)
    fastpath.prepare(model)
    reference = reference_model(arch)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            assert torch.allclose(model(torch.tensor([ids])).logits, reference(torch.tensor([ids])).logits,
                                  atol=1e-4, rtol=0)
        assert greedy(model, ids, 30) == greedy(reference, ids, 30)
    assert fastpath.prepare(model) == fastpath.FastPath()  # a second call finds nothing left to do


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_tied_output_embeddings_stay_shared_and_are_not_copied(arch, model_dirs):
    model = fresh(model_dirs, arch)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    done = fastpath.prepare(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert done.fused_attention == 0  # neither is of the Llama family
    assert done.packed_linear == (0 if arch == "gpt2" else 6 * model.config.num_hidden_layers)  # GPT-2: Conv1D


def test_the_fast_path_can_be_turned_off_and_is_for_cpu_only(model_dirs, load_pair):
    model = fresh(model_dirs, "llama")
    _, tokenizer = load_pair("llama")
    engine = Engine(model, tokenizer, fast_path=False)
    assert engine.runner.fast_path.skipped == "turned off"
    assert hasattr(model.model.layers[0].self_attn, "q_proj") and "weight" in model.lm_head._parameters

    with torch.device("meta"):
        on_meta = AutoModelForCausalLM.from_config(model.config)
    skipped = fastpath.prepare(on_meta)
    assert skipped.skipped == "the model is on meta, the fast path is for CPU"
    assert hasattr(on_meta.model.layers[0].self_attn, "q_proj")


def test_the_worker_hands_back_the_load_buffers_pages_of_replaced_weights(tmp_path, model_dirs, load_pair,
                                                                          reference_model):
    """hpcllm's loader keeps weights as views of its buffers: dropping a module's weight frees nothing there, so
    the worker releases the pages of the weights the fast path replaced (not twice the linear weights in memory)."""
    from hpcllm.checkpoint import convert
    from hpcllm.store import load_model
    from hpcllm.worker.server import ModelForServing, WorkerService

    convert(model_dirs["llama"], tmp_path / "ckpt", progress=False)
    loaded = load_model(tmp_path / "ckpt")
    service = WorkerService("tiny", "secret")
    engine = service.attach(ModelForServing(loaded.model, loaded.tokenizer, owner=loaded))
    try:
        ranges = engine.runner.fast_path.dropped_ranges
        layers = loaded.model.config.num_hidden_layers
        assert len(ranges) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer; lm_head (untied)
        assert loaded.discard(ranges) >= sum(length for _, length in ranges) // 2  # whole pages of each
        _, tokenizer = load_pair("llama")
        for number, prompt in enumerate(PROMPTS):  # nothing the model still reads was released
            ids = tokenizer(prompt)["input_ids"]
            result = engine.generate(GenerateRequest(request_id=f"d-{number}", prompt_token_ids=ids, max_tokens=20,
                                                     temperature=0, ignore_eos=True))
            assert result.token_ids == greedy(reference_model("llama"), ids, 20)
    finally:
        engine.shutdown()
        loaded.release()


def _mixed_batch(vocab: int):
    """Two prefills (a first chunk and a later one) and three decodes of different contexts, out of order."""
    from hpcllm.worker.runner import SequenceChunk, StepBatch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (200,), generator=generator).tolist()
    blocks = iter(range(1000))
    chunk = lambda seq, tokens, start: SequenceChunk(seq, tokens, start, [next(blocks) for _ in range(-(-(start + len(tokens)) // 4))])  # noqa: E731
    return StepBatch([chunk(0, ids[40:41], 40), chunk(1, ids[:17], 0), chunk(2, ids[5:6], 5),
                      chunk(3, ids[30:38], 30), chunk(4, ids[90:91], 90)])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_lean_step_gives_the_module_path_s_logits(arch, model_dirs):
    """Same step (prefills and decodes mixed, prefix KV written by an earlier step), once through the lean step and
    once through transformers' modules: the logits agree to float rounding and pick the same tokens."""
    from hpcllm.worker.runner import PagedRunner

    results = []
    for lean in (True, False):
        runner = PagedRunner(fresh(model_dirs, arch), num_blocks=1000, block_size=4)
        assert runner.fast_path.lean_step == "on"
        if not lean:
            runner.lean_step = None
        batch = _mixed_batch(runner.model.config.vocab_size)
        with torch.inference_mode():
            # The chunks' earlier positions: each sequence's prefix, run first as prefills (the KV the step reads).
            from hpcllm.worker.runner import SequenceChunk, StepBatch
            prefix = StepBatch([SequenceChunk(c.seq_id, [7] * c.start, 0, c.block_table) for c in batch.chunks
                                if c.start])
            runner.step(prefix)
            results.append(runner.step(batch))
    lean_logits, module_logits = results
    assert lean_logits.shape == module_logits.shape == (5, fresh(model_dirs, arch).config.vocab_size)
    torch.testing.assert_close(lean_logits, module_logits, rtol=1e-4, atol=1e-4)
    assert lean_logits.argmax(-1).tolist() == module_logits.argmax(-1).tolist()


def test_the_lean_step_is_not_used_where_modules_have_hooks_or_another_rotation(model_dirs, monkeypatch):
    from hpcllm.worker import runner as runner_module

    model = fresh(model_dirs, "llama")
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *_: None)  # e.g. the TP all-reduce
    runner = runner_module.PagedRunner(model, num_blocks=64, block_size=4)
    assert runner.lean_step is None and "hooks" in runner.fast_path.lean_step

    modeling = __import__(type(model.model.layers[0].self_attn).__module__, fromlist=["x"])
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", lambda q, k, cos, sin: (q * cos.unsqueeze(1), k))
    runner = runner_module.PagedRunner(fresh(model_dirs, "llama"), num_blocks=64, block_size=4)
    assert runner.lean_step is None and "rotary" in runner.fast_path.lean_step

    runner = runner_module.PagedRunner(fresh(model_dirs, "gpt2"), num_blocks=64, block_size=4)
    assert runner.lean_step is None and "Llama family" in runner.fast_path.lean_step
