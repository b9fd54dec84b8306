"""Speculative decoding by n-gram prompt lookup ([worker] speculative_ngram_tokens): greedy output token for token
what decoding one token per step gives (and transformers' generate), with proposals accepted, partly accepted and
rejected; in the worker process and in a model process with asynchronous scheduling; under preemption, resumed,
and ending mid-proposal (max_tokens, a stop token)."""

import itertools

import pytest

from hpcllm.config import WorkerConfig
from hpcllm.worker.engine import Engine
from hpcllm.worker.ngram import NgramProposer
from hpcllm.worker.protocol import GenerateRequest

from .copying_model import cycle_from, rewire_to_copy
from .test_batching import PROMPTS, hf_greedy

_ids = itertools.count()
MORE_PROMPTS = PROMPTS + ["one two three one two three one two three", "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1,",
                          "the cat sat on the mat. the cat sat on the", "a"]


def request(**fields) -> GenerateRequest:
    fields.setdefault("request_id", f"s{next(_ids)}")
    return GenerateRequest(temperature=0, ignore_eos=True, **fields)


def run_together(engine: Engine, requests: list[GenerateRequest]):
    """Submit all before the engine steps any: per request (token ids, final line)."""
    with engine._lock:
        streams = [engine.submit(r) for r in requests]
    results = []
    for stream in streams:
        events = list(stream.events())
        results.append(([e.token_id for e in events[:-1]], events[-1]))
    return results


def spec_counts(engine: Engine) -> tuple[int, int]:
    metrics = engine.metrics
    return int(metrics.spec_proposed_tokens._value.get()), int(metrics.spec_accepted_tokens._value.get())


@pytest.fixture(scope="module")
def copying(model_dirs):
    """(model factory, tokenizer, successor table) of the tiny Llama rewired to copy (copying_model.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs["llama"]

    def load():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        return model, rewire_to_copy(model)

    reference, successor = load()
    return (lambda: load()[0]), AutoTokenizer.from_pretrained(path), successor, reference


def test_the_proposal_follows_the_earliest_occurrence_of_the_longest_matching_suffix():
    proposer = NgramProposer(3, max_n=3, min_n=2)
    assert proposer.propose([1, 2, 3, 4, 5, 9, 2, 3], 10) == [4, 5, 9]  # [2, 3] matches; [9, 2, 3] does not
    assert proposer.propose([7, 2, 3, 8, 1, 2, 3, 6, 1, 2, 3], 10) == [6, 1, 2]  # [1, 2, 3] beats [2, 3]
    assert proposer.propose([1, 2, 5, 1, 2, 6, 1, 2], 10) == [5, 1, 2]  # the earliest of two
    assert proposer.propose([1, 2, 5, 1, 2], 1) == [5]  # the caller's limit
    assert proposer.propose([1, 2, 3, 4], 10) == []  # no earlier occurrence
    assert proposer.propose([256, 1, 2, 256, 1], 10) == [2, 256, 1]  # ids, not bytes, are matched
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(4, max_n=2, min_n=3)


@pytest.mark.parametrize("model_process", [False, True])
@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_speculative_greedy_output_equals_one_token_per_step_and_generate(arch, model_process, model_dirs,
                                                                          reference_model, make_engine):
    """Random weights: proposals are made and mostly rejected (some accepted): the output must not change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()  # as loaded: a model process takes it
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    prompt_ids = [tokenizer(p)["input_ids"] for p in MORE_PROMPTS]
    lengths = [40 + 7 * i for i in range(len(prompt_ids))]
    expected = [hf_greedy(reference_model(arch), ids, n) for ids, n in zip(prompt_ids, lengths)]
    engine = make_engine(model, tokenizer, speculative_ngram_tokens=4, model_process=model_process,
                     prefill_chunk_tokens=8)
    results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=n)
                                     for ids, n in zip(prompt_ids, lengths)])
    assert [tokens for tokens, _ in results] == expected
    proposed, accepted = spec_counts(engine)
    assert proposed > 0
    if arch == "opt":  # the one whose random greedy output repeats itself enough to accept proposals
        assert accepted > 0


@pytest.mark.parametrize("model_process,batching", [(False, "auto"), (True, "auto"), (False, "sequential")])
def test_a_prompt_the_output_copies_takes_several_tokens_per_step_and_the_same_tokens(copying, model_process,
                                                                                      batching, make_engine):
    load, tokenizer, successor, reference = copying
    document = cycle_from(successor, 500, 120)
    # The document, something else, then its first token: the output copies the document from its second token.
    prompt = document + cycle_from(successor, 7, 10)[::-1] + document[:1]
    expected = hf_greedy(reference, prompt, 100)
    assert expected == document[1:101]  # the rewired model copies
    plain = make_engine(load(), tokenizer)
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=5, model_process=model_process, batching=batching)
    [(off, _)] = run_together(plain, [request(prompt_token_ids=prompt, max_tokens=100)])
    [(on, final)] = run_together(engine, [request(prompt_token_ids=prompt, max_tokens=100)])
    assert on == off == expected and final.finish_reason == "length"
    proposed, accepted = spec_counts(engine)
    assert accepted == proposed  # every proposal copied the document
    # Each step's tokens are its accepted proposal and one more: 6 tokens a step but for the first two (the prefill's,
    # and the first decode's, before the output holds an n-gram of the document).
    assert 100 - accepted <= 2 + -(-98 // 6)


def test_a_request_ends_mid_proposal_at_max_tokens_and_at_a_stop_token(copying, make_engine):
    load, tokenizer, successor, _ = copying
    document = cycle_from(successor, 42, 60)
    prompt = document + document[:1]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=8)
    by_length, by_stop = run_together(engine, [request(prompt_token_ids=prompt, max_tokens=13),
                                               request(prompt_token_ids=prompt, max_tokens=50,
                                                       stop_token_ids=[document[20]])])
    assert by_length[0] == document[1:14] and by_length[1].finish_reason == "length"
    assert by_stop[0] == document[1:21] and by_stop[1].finish_reason == "stop"
    assert engine.kv_pool.used_blocks == 0


def test_speculation_under_preemption_and_resumed_from_token_ids_keeps_the_output(copying, make_engine):
    """A tiny KV budget preempts and recomputes requests mid-copy; a request resumed from its first tokens (as a
    migrated or failed-over one is) continues exactly."""
    load, tokenizer, successor, reference = copying
    prompts = [cycle_from(successor, start, 24) + [start] for start in (3, 300, 600, 900)]
    expected = [hf_greedy(reference, ids, 30) for ids in prompts]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4, max_model_len=64, kv_cache_tokens=80,
                     kv_block_size=4, max_running_requests=4)
    results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=30) for ids in prompts])
    assert [tokens for tokens, _ in results] == expected
    assert engine.metrics.preemptions._value.get() > 0 and spec_counts(engine)[1] > 0
    [(resumed, _)] = run_together(engine, [request(prompt_token_ids=prompts[0], max_tokens=30,
                                                   resume_token_ids=expected[0][:5])])
    assert resumed == expected[0][5:]


def test_sampled_requests_and_logprobs_are_not_speculated(copying, make_engine):
    load, tokenizer, successor, _ = copying
    prompt = cycle_from(successor, 11, 40) + [11]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4)
    run_together(engine, [request(prompt_token_ids=prompt, max_tokens=20, logprobs=1),
                          GenerateRequest(request_id=f"s{next(_ids)}", prompt_token_ids=prompt, max_tokens=20,
                                          temperature=0.8, seed=3)])
    assert spec_counts(engine) == (0, 0)


def test_the_worker_config_key_is_off_by_default_and_refuses_negatives():
    assert WorkerConfig().speculative_ngram_tokens == 0
    with pytest.raises(ValueError, match="speculative_ngram_tokens"):
        WorkerConfig(speculative_ngram_tokens=-1)
