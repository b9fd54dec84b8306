"""Decode steps through static buffers (graphs.py): what a CUDA graph replays must be what the eager step computes.

On a CPU the static step runs uncaptured (`cuda_graphs="eager"`): the same buckets, padded rows, scratch KV slot and
static padding a replay uses, checked against transformers' generate. On CUDA the step is captured and replayed."""

import pytest
import torch

from hpcllm.worker import graphs
from hpcllm.worker.engine import Engine
from hpcllm.worker.graphs import DecodeGraphs, row_buckets

from .conftest import ARCHS
from .test_batching import PROMPTS, engines, hf_greedy, request  # noqa: F401 - engines: a fixture


def test_the_kv_pool_size_comes_from_the_model_config(load_pair):
    model, _ = load_pair("llama")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_slot = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2  # keys + values, bf16
    assert graphs.kv_pool_bytes(config, torch.bfloat16, 1000) == 1000 * per_slot
    assert graphs.kv_pool_bytes(type("Bare", (), {})(), torch.float32, 1000) is None


def test_row_buckets_cover_every_batch_up_to_the_engine_limit():
    assert row_buckets(1) == [1]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(8) == [1, 2, 4, 8]


def _greedy_through_static_steps(counting_engines, model, tokenizer, reference, device=None):
    """Three requests of different prompt and output lengths in a 4-row engine: the batch shrinks from 3 live rows
    (a 4-row bucket with one padded row) to 1, and contexts cross 8-position buckets."""
    counting = counting_engines(model, tokenizer, prefill_chunk_tokens=8, max_running_requests=4,
                                cuda_graphs="eager" if device is None else True)
    lengths = [30, 12, 21]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    expected = []
    for ids, n in zip(prompt_ids, lengths):
        expected.append(hf_greedy(reference, ids, n) if device is None else reference.generate(
            torch.tensor([ids], device=device), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist())
    results = counting.run_together(
        [request(prompt_token_ids=ids, max_tokens=n, temperature=0) for ids, n in zip(prompt_ids, lengths)])
    return [tokens for tokens, _ in results], expected, counting.engine.runner.decode_graphs


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_steps_equal_generate_through_padded_buckets(arch, load_pair, reference_model, engines,
                                                                   monkeypatch):
    monkeypatch.setattr(graphs, "CONTEXT_BUCKET", 8)
    model, tokenizer = load_pair(arch)
    tokens, expected, decode_graphs = _greedy_through_static_steps(engines, model, tokenizer, reference_model(arch))
    assert tokens == expected
    used = {shape: step.replays for shape, step in decode_graphs.steps.items() if step.replays}
    assert {rows for rows, _ in used} == {4, 2, 1}  # 3 live rows padded to 4, then 2, then 1
    assert len({positions for _, positions in used}) > 2  # contexts crossed buckets: a graph per shape
    assert decode_graphs.eager_steps == 0


def test_a_context_past_the_largest_bucket_runs_eagerly(load_pair, reference_model, engines, monkeypatch):
    monkeypatch.setattr(graphs, "CONTEXT_BUCKET", 8)
    model, tokenizer = load_pair("llama")
    counting = engines(model, tokenizer, max_running_requests=2, cuda_graphs="eager")
    decode_graphs = counting.engine.runner.decode_graphs
    decode_graphs.max_positions = 16  # as if max_model_len were 16: longer contexts have no graph
    ids = tokenizer(PROMPTS[0])["input_ids"]
    [(tokens, _)] = counting.run_together([request(prompt_token_ids=ids, max_tokens=24, temperature=0)])
    assert tokens == hf_greedy(reference_model("llama"), ids, 24)
    assert decode_graphs.eager_steps > 0 and max(p for _, p in decode_graphs.steps) == 16


def test_cuda_graphs_are_refused_clearly_without_cuda_or_the_paged_runner(load_pair):
    model, tokenizer = load_pair("llama")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
        Engine(model, tokenizer, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs the paged runner .* not SequentialRunner"):
        Engine(model, tokenizer, cuda_graphs="eager", batching="sequential")
    with pytest.raises(ValueError, match="decode graph mode must be one of cuda, eager"):
        DecodeGraphs(Engine(model, tokenizer).runner, max_rows=2, max_context=64, mode="later")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_captured_decode_steps_on_cuda_equal_generate_on_cuda(arch, model_dirs, engines, monkeypatch):
    """Captured and replayed: the same tokens as generate on the GPU, through padded rows and several graphs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (CPU-only torch or no GPU)")
    monkeypatch.setattr(graphs, "CONTEXT_BUCKET", 8)
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).to("cuda").eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    with torch.no_grad():
        tokens, expected, decode_graphs = _greedy_through_static_steps(engines, model, tokenizer, reference, "cuda")
    assert tokens == expected
    assert decode_graphs.captures >= 3 and decode_graphs.eager_steps == 0


def test_a_failed_capture_turns_graphs_off_and_the_engine_serves_on(load_pair, reference_model, engines, caplog):
    """Here a capture fails for want of CUDA; on a GPU it would be an operation a capture forbids, or no memory."""
    model, tokenizer = load_pair("llama")
    counting = engines(model, tokenizer, max_running_requests=2, cuda_graphs="eager")
    decode_graphs = counting.engine.runner.decode_graphs
    decode_graphs.mode = "cuda"  # the next new shape is captured
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with caplog.at_level("ERROR", logger="hpcllm.worker.graphs"):
        [(tokens, final)] = counting.run_together([request(prompt_token_ids=ids, max_tokens=12, temperature=0)])
    assert tokens == hf_greedy(reference_model("llama"), ids, 12) and final.finish_reason == "length"
    assert decode_graphs.disabled and decode_graphs.captures == 0
    assert "decode steps run eagerly from now on" in caplog.text


def test_ready_reports_the_decode_graphs(load_pair, start_worker):
    """An operator sees whether graphs are in use: the shapes, captures, decode steps that ran eagerly, and why graphs
    stopped if a capture failed; a worker without them reports nothing."""
    from hpcllm.worker.protocol import GenerateRequest

    plain = start_worker(load_pair("llama"))
    assert "cuda_graphs" not in plain.client.ready()
    worker = start_worker(load_pair("llama"), cuda_graphs="eager", max_running_requests=2)
    events = list(worker.client.generate(GenerateRequest(request_id="g1", prompt=PROMPTS[0], max_tokens=6,
                                                         temperature=0)))
    assert events[-1].finish_reason == "length"
    graphs_state = worker.client.ready()["cuda_graphs"]
    assert graphs_state["mode"] == "eager" and graphs_state["shapes"] == 1 and graphs_state["disabled"] is None
    assert graphs_state["captured"] == 0 and graphs_state["eager_decode_steps"] == 0
