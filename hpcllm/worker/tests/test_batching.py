"""Continuous batching: one forward per step over every running request, KV blocks, preemption by recompute.

A request's tokens must not depend on what else runs: greedy output equals transformers' generate and seeded
sampling is the same alone or in a batch, also when the KV budget forces preemption."""

import itertools

import pytest
import torch

from hpcllm.worker.engine import Engine
from hpcllm.worker.protocol import FinalLine, GenerateRequest
from hpcllm.worker.runner import (PagedRunner, SequenceChunk, SequentialRunner, StepBatch, attention_kernels,
                                  padding_allowance_for)

from .conftest import ARCHS

_ids = itertools.count()
PROMPTS = ["hello world, this", "the", "🙂 日本語 テスト and a longer prompt that takes a few chunks to prefill", "a b c"]


def request(**fields) -> GenerateRequest:
    fields.setdefault("request_id", f"b{next(_ids)}")
    return GenerateRequest(**fields)


class CountingEngine:
    """An engine whose steps are recorded: how many sequences each forward ran."""

    def __init__(self, model, tokenizer, **options):
        self.engine = Engine(model, tokenizer, model_name="tiny", **options)
        self.batch_sizes: list[int] = []
        self.tokens_fed = 0
        forward = self.engine._forward

        def counting_forward(batch):
            self.batch_sizes.append(len(batch.chunks))
            self.tokens_fed += sum(len(chunk.token_ids) for chunk in batch.chunks)
            return forward(batch)

        self.engine._forward = counting_forward
        self.engine.start()

    def run_together(self, requests: list[GenerateRequest]):
        """Submit all before the engine steps any; the completions (token ids, finish lines), in order."""
        with self.engine._lock:
            streams = [self.engine.submit(r) for r in requests]
        results = []
        for stream in streams:
            events = list(stream.events())
            results.append(([e.token_id for e in events[:-1]], events[-1]))
        return results


@pytest.fixture
def engines():
    made = []

    def make(model, tokenizer, **options) -> CountingEngine:
        counting = CountingEngine(model, tokenizer, **options)
        made.append(counting.engine)
        return counting

    yield make
    for engine in made:
        engine.shutdown()


def hf_greedy(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("grouping_of", ["cpu", "cuda"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_generate_for_requests_of_different_lengths(arch, grouping_of, load_pair,
                                                                          reference_model, engines):
    """The decode grouping of each device; cuda's (every decode in one attention call over contexts padded to the
    longest) runs here on the CPU: the padding is masked out exactly."""
    model, tokenizer = load_pair(arch)
    counting = engines(model, tokenizer, prefill_chunk_tokens=8)
    assert isinstance(counting.engine.runner, PagedRunner)  # every dev architecture is served batched
    counting.engine.runner.padding_allowance = padding_allowance_for(torch.device(grouping_of))
    lengths = [30, 12, 25, 40]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [hf_greedy(reference_model(arch), ids, n) for ids, n in zip(prompt_ids, lengths)]
    results = counting.run_together(
        [request(prompt_token_ids=ids, max_tokens=n, temperature=0) for ids, n in zip(prompt_ids, lengths)]
    )
    assert [tokens for tokens, _ in results] == expected
    assert max(counting.batch_sizes) == len(PROMPTS)  # all four ran in one forward
    assert len(counting.batch_sizes) < sum(lengths)  # far fewer forwards than tokens


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(load_pair, engines):
    model, tokenizer = load_pair("llama")
    counting = engines(model, tokenizer)
    sampled = dict(prompt=PROMPTS[0], max_tokens=30, temperature=0.9, top_p=0.95, top_k=40, seed=1234,
                   ignore_eos=True)
    [(alone, _)] = counting.run_together([request(**sampled)])
    others = [request(prompt=p, max_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[1:])]
    batched = counting.run_together([*others[:1], request(**sampled), *others[1:]])
    assert batched[1][0] == alone
    assert max(counting.batch_sizes) == len(PROMPTS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_preemption_under_a_tiny_kv_budget_keeps_greedy_output(arch, load_pair, reference_model, engines):
    model, tokenizer = load_pair(arch)
    # 64 tokens of KV for four requests that need ~45 each: they cannot all stay; the newest are preempted and
    # later recomputed from their token ids.
    counting = engines(model, tokenizer, max_model_len=64, kv_cache_tokens=64, kv_block_size=4,
                       max_running_requests=4)
    prompt_ids = [tokenizer(p)["input_ids"][:12] for p in PROMPTS]
    expected = [hf_greedy(reference_model(arch), ids, 32) for ids in prompt_ids]
    results = counting.run_together(
        [request(prompt_token_ids=ids, max_tokens=32, temperature=0, ignore_eos=True) for ids in prompt_ids]
    )
    assert [tokens for tokens, _ in results] == expected
    assert all(final.finish_reason == "length" for _, final in results)
    engine = counting.engine
    assert engine.metrics.preemptions._value.get() > 0
    assert engine.kv_pool.used_blocks == 0  # everything freed at the end


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_and_preemption_on_cuda_equal_generate_on_cuda(arch, model_dirs, engines):
    """The paged runner's KV pool, block tables and decode groups live on the model's GPU: four requests of
    different lengths in one forward, the newest preempted under a tiny KV budget and recomputed, each equal to
    transformers' generate on the same GPU; seeded sampling the same alone and in the batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).to("cuda").eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    prompt_ids = [tokenizer(p)["input_ids"][:12] for p in PROMPTS]
    with torch.no_grad():
        expected = [reference.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=32)
                    [0, len(ids):].tolist() for ids in prompt_ids]
    counting = engines(model, tokenizer, max_model_len=64, kv_cache_tokens=64, kv_block_size=4,
                       max_running_requests=4, prefill_chunk_tokens=8)
    assert isinstance(counting.engine.runner, PagedRunner)
    results = counting.run_together(
        [request(prompt_token_ids=ids, max_tokens=32, temperature=0, ignore_eos=True) for ids in prompt_ids])
    assert [tokens for tokens, _ in results] == expected
    assert max(counting.batch_sizes) > 1
    assert counting.engine.metrics.preemptions._value.get() > 0
    assert counting.engine.kv_pool.used_blocks == 0
    sampled = dict(prompt_token_ids=prompt_ids[0], max_tokens=20, temperature=0.9, top_p=0.95, seed=7,
                   ignore_eos=True)
    [(alone, _)] = counting.run_together([request(**sampled)])
    batched = counting.run_together([request(prompt_token_ids=prompt_ids[1], max_tokens=20, temperature=1.0, seed=1),
                                     request(**sampled)])
    assert batched[1][0] == alone


def test_a_kv_budget_below_one_context_is_refused(load_pair):
    model, tokenizer = load_pair("llama")
    with pytest.raises(ValueError, match="kv_cache_tokens 32 cannot hold one full context of max_model_len 64"):
        Engine(model, tokenizer, max_model_len=64, kv_cache_tokens=32)


def test_requests_beyond_the_kv_budget_wait_and_all_finish(load_pair, engines):
    model, tokenizer = load_pair("llama")
    counting = engines(model, tokenizer, max_model_len=48, kv_cache_tokens=48, kv_block_size=8,
                       max_running_requests=8)
    prompt_ids = tokenizer(PROMPTS[0])["input_ids"]
    results = counting.run_together(
        [request(prompt_token_ids=prompt_ids, max_tokens=30, temperature=0, ignore_eos=True) for _ in range(6)]
    )
    assert len({tuple(tokens) for tokens, _ in results}) == 1
    assert all(final.finish_reason == "length" and len(tokens) == 30 for tokens, final in results)


def test_sequential_mode_is_the_unbatched_baseline_with_the_same_output(load_pair, reference_model, engines):
    model, tokenizer = load_pair("qwen2")
    counting = engines(model, tokenizer, batching="sequential")
    assert isinstance(counting.engine.runner, SequentialRunner)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    results = counting.run_together([request(prompt_token_ids=ids, max_tokens=15, temperature=0) for ids in prompt_ids])
    assert [tokens for tokens, _ in results] == [hf_greedy(reference_model("qwen2"), ids, 15) for ids in prompt_ids]


def test_cancelled_request_leaves_the_batch_and_frees_its_blocks(load_pair, engines):
    model, tokenizer = load_pair("llama")
    counting = engines(model, tokenizer)
    engine = counting.engine
    with engine._lock:
        doomed = engine.submit(request(prompt=PROMPTS[0], max_tokens=200, ignore_eos=True))
        kept = engine.submit(request(prompt=PROMPTS[1], max_tokens=20, temperature=0))
    events = doomed.events()
    next(events)
    engine.cancel(doomed.request_id)
    final = [e for e in kept.events() if isinstance(e, FinalLine)][0]
    assert final.finish_reason in ("length", "stop")
    assert engine.tokens(doomed.request_id).finish_reason == "abort"
    assert engine.kv_pool.used_blocks == 0


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_shared_prompt_prefix_is_prefilled_once(arch, load_pair, reference_model, engines):
    model, tokenizer = load_pair(arch)
    counting = engines(model, tokenizer, kv_block_size=4)
    system = tokenizer("You are a helpful assistant. Answer briefly and politely, in plain words.")["input_ids"]
    assert len(system) >= 12
    first, second = system + tokenizer("the")["input_ids"][-1:], system + tokenizer("hello world")["input_ids"][-2:]
    [(tokens, _)] = counting.run_together([request(prompt_token_ids=first, max_tokens=5, temperature=0)])
    assert tokens == hf_greedy(reference_model(arch), first, 5)
    fed_before = counting.tokens_fed
    [(tokens, _)] = counting.run_together([request(prompt_token_ids=second, max_tokens=5, temperature=0)])
    assert tokens == hf_greedy(reference_model(arch), second, 5)
    reused = (len(system) // 4) * 4  # the system prompt's full blocks
    assert counting.tokens_fed - fed_before == len(second) - reused + 4  # the rest, then 4 decode steps
    assert counting.engine.metrics.prefix_cache_hits._value.get() == reused


def test_prefix_caching_keeps_outputs_under_preemption_and_is_off_for_the_sequential_runner(load_pair, reference_model,
                                                                                            engines):
    model, tokenizer = load_pair("llama")
    system = tokenizer("You are a helpful assistant. Answer briefly.")["input_ids"]
    prompts = [system + tokenizer(p)["input_ids"][-3:] for p in PROMPTS]
    expected = [hf_greedy(reference_model("llama"), ids, 24) for ids in prompts]
    counting = engines(model, tokenizer, max_model_len=64, kv_cache_tokens=96, kv_block_size=4)
    results = counting.run_together(
        [request(prompt_token_ids=ids, max_tokens=24, temperature=0, ignore_eos=True) for ids in prompts])
    assert [tokens for tokens, _ in results] == expected
    assert counting.engine.metrics.preemptions._value.get() > 0
    assert counting.engine.kv_pool.used_blocks == 0
    sequential = engines(model, tokenizer, batching="sequential")
    assert not sequential.engine.kv_pool.prefix_caching


def test_models_the_paged_runner_cannot_express_fall_back_to_one_forward_per_request(model_dirs, load_pair):
    from transformers import AutoModelForCausalLM

    _, tokenizer = load_pair("gpt2")
    eager = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="batching='paged' cannot serve this model: .*'eager' attention"):
        Engine(eager, tokenizer, batching="paged")
    engine = Engine(eager, tokenizer).start()
    try:
        assert isinstance(engine.runner, SequentialRunner)
        ids = tokenizer(PROMPTS[0])["input_ids"]
        done = engine.generate(request(prompt_token_ids=ids, max_tokens=10, temperature=0))
        assert done.token_ids == hf_greedy(eager, ids, 10)
    finally:
        engine.shutdown()


def test_decodes_share_attention_calls_by_context_length_on_cpu_and_one_call_on_a_gpu(load_pair):
    model, _ = load_pair("llama")
    runner = PagedRunner(model, num_blocks=64, block_size=4)
    decodes = [(1, context, list(range(-(-context // 4)))) for context in [5, 6, 40, 44, 120]]
    groups, slots = runner._decode_groups(decodes)
    assert [(g.begin, g.end) for g in groups] == [(0, 2), (2, 4), (4, 5)]  # padding bounded on CPU
    assert [g.offset for g in groups] == [0, 2 * 6, 2 * 6 + 2 * 44] and slots.shape == (2 * 6 + 2 * 44 + 120,)
    runner.padding_allowance = padding_allowance_for(torch.device("cuda"))
    [group], slots = runner._decode_groups(decodes)
    assert slots.shape == (5 * 120,) and group.padding[:, 0, 0].sum(dim=1).tolist() == [115, 114, 80, 76, 0]


def test_paged_steps_on_cuda_never_use_cudnn_attention():
    """cuDNN's SDPA plans per shape (~1.7 ms of CPU a call on an H200) and a decode's shape changes every step."""
    with attention_kernels(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored for the rest of the process
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_decode_gathers_reuse_the_pools_buffers_and_compute_the_same(load_pair):
    """A layer's decode keys/values are gathered into buffers the KV pool keeps (a fresh multi-MB tensor per layer
    was mapped and faulted in anew: ~2x slower steps at 64 long contexts, bench/decode_step.py --context); same
    logits as fresh gathers, and the buffers are not reallocated while the steps fit them."""
    model, _ = load_pair("llama")
    results = {}
    for keep in (True, False):
        runner = PagedRunner(model, num_blocks=64, block_size=4)
        runner.pool.keep_gather_buffers = keep
        prompts = [list(range(10 + n, 30 + 3 * n)) for n in range(3)]
        tables = [list(range(16 * n, 16 * n + 16)) for n in range(3)]
        with torch.inference_mode():
            runner.step(StepBatch([SequenceChunk(n, p, 0, t) for n, (p, t) in enumerate(zip(prompts, tables))]))
            logits, buffers = [], []
            for step in range(3):
                chunks = [SequenceChunk(n, [5 + step], len(p) + step, t)
                          for n, (p, t) in enumerate(zip(prompts, tables))]
                logits.append(runner.step(StepBatch(chunks)))
                buffers.append(runner.pool._gathered)
        results[keep] = torch.stack(logits)
        if keep:
            assert buffers[0] is not None and all(b is buffers[0] for b in buffers)  # one allocation for 3 steps
        else:
            assert buffers == [None] * 3
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)


def _mixed_step(prompts: list[list[int]]) -> list[SequenceChunk]:
    """One step over sequences whose prompts were prefilled: two plain decodes, verifications of 1, 2 and 5
    proposed tokens (every position's logits), a 20-token prefill chunk after cached tokens, and a new prompt's
    first chunk."""
    tables = [list(range(20 * n, 20 * n + 20)) for n in range(len(prompts) + 1)]

    def after(n: int, fed: list[int], **options) -> SequenceChunk:
        return SequenceChunk(n, fed, len(prompts[n]), tables[n], **options)

    return [after(0, [7]), after(1, [9]), after(2, [4, 8], logits_positions=2),
            after(3, [5, 6, 7, 8, 9, 10], logits_positions=6), after(4, [11, 3], logits_positions=2),
            after(5, list(range(30, 50))), SequenceChunk(6, list(range(12, 25)), 0, tables[6])]


@pytest.mark.parametrize("grouping_of", ["cpu", "cuda"])
@pytest.mark.parametrize("arch", ARCHS)
def test_verifications_beside_decodes_and_prefill_chunks_give_the_logits_each_chunk_gets_alone(
        arch, grouping_of, load_pair, monkeypatch):
    """Speculative verification chunks are attended in the decodes' grouped calls (query j of a chunk sees its
    context and the chunk's tokens up to j): every logits row equals that chunk's step run alone, a verification
    attended on its own as before; on a GPU the decodes and verifications of a layer are ONE attention call."""
    model, _ = load_pair(arch)
    prompts = [list(range(3 + n, 20 + 9 * n)) for n in range(6)]
    tables = [list(range(20 * n, 20 * n + 20)) for n in range(7)]
    mixed, alone = (PagedRunner(model, num_blocks=160, block_size=4) for _ in range(2))
    mixed.padding_allowance = padding_allowance_for(torch.device(grouping_of))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    with torch.inference_mode():
        for runner in (mixed, alone):
            runner.step(StepBatch([SequenceChunk(n, p, 0, t) for n, (p, t) in enumerate(zip(prompts, tables))]))
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
        together = mixed.step(StepBatch(_mixed_step(prompts)))
        monkeypatch.undo()
        alone.max_grouped_tokens = 1  # a verification attended on its own
        separately = torch.cat([alone.step(StepBatch([chunk])) for chunk in _mixed_step(prompts)])
    assert together.shape == (1 + 1 + 2 + 6 + 2 + 1 + 1, model.config.vocab_size)
    torch.testing.assert_close(together, separately, rtol=1e-5, atol=1e-5)
    assert together.argmax(dim=1).tolist() == separately.argmax(dim=1).tolist()
    if grouping_of == "cuda":  # per layer: the decodes and verifications, and each of the two prefill chunks
        assert len(calls) == 3 * model.config.num_hidden_layers
