"""Speculative decoding by n-gram prompt lookup ([worker] speculative_ngram_tokens): greedy output token for token
what decoding one token per step gives (and transformers' generate), with proposals accepted, partly accepted and
rejected; in the worker process and in a model process with asynchronous scheduling; under preemption, resumed,
and ending mid-proposal (max_tokens, a stop token). Sampled requests: the same tokens as without speculation for
the same seed. The adaptive rule: a request whose proposals are rejected stops proposing, a copying one goes on."""

import itertools
import json

import pytest
import torch

from hpcllm.config import WorkerConfig
from hpcllm.worker.engine import Engine
from hpcllm.worker.ngram import (LOOKUP_MISSES, MAX_BACKOFF_STEPS, MAX_LOOKUP_BACKOFF_STEPS, NgramProposer,
                                 SpeculationRecord)
from hpcllm.worker.protocol import GenerateRequest, Thinking
from hpcllm.worker.sampling import SamplingParams, sample_token, sampling_probs, verify_proposal

from .copying_model import cycle_from, rewire_to_copy, run_out_of_memory_at_flagged_steps
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


# Every architecture in process and on the sequential runner; with a model process by default only opt, whose random
# greedy output accepts proposals (the model-process speculation of the tiny Llama: the copying tests below).
# gpt2 and llama with a model process run in `make test-long`.
@pytest.mark.parametrize("arch,model_process,batching", [
    pytest.param(arch, model_process, batching, id=f"{arch}-{model_process}-{batching}",
                 marks=[pytest.mark.long] if model_process and arch != "opt" else [])
    for arch in ("opt", "gpt2", "llama") for model_process, batching in ((False, "auto"), (True, "auto"),
                                                                         (False, "sequential"))])
def test_speculative_greedy_output_equals_one_token_per_step_and_generate(arch, model_process, batching, model_dirs,
                                                                          reference_model, make_engine):
    """Random weights: proposals are made and mostly rejected (some accepted): the output must not change. The
    sequential runner too, whose per-request cache had kept a rejected position's keys and values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()  # as loaded: a model process takes it
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    prompt_ids = [tokenizer(p)["input_ids"] for p in MORE_PROMPTS]
    lengths = [40 + 7 * i for i in range(len(prompt_ids))]
    expected = [hf_greedy(reference_model(arch), ids, n) for ids, n in zip(prompt_ids, lengths)]
    engine = make_engine(model, tokenizer, speculative_ngram_tokens=4, model_process=model_process,
                         prefill_chunk_tokens=8, batching=batching)
    results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=n)
                                     for ids, n in zip(prompt_ids, lengths)])
    assert [tokens for tokens, _ in results] == expected
    proposed, accepted = spec_counts(engine)
    # The tiny llama's output matches its earlier ids twice in ~500 lookups; with a model process a request whose
    # lookups find nothing looks up only every 8th step (SpeculationRecord.missed), and may miss both.
    assert proposed > 0 or (arch == "llama" and model_process)
    if arch == "opt":  # the one whose random greedy output repeats itself enough to accept proposals
        assert accepted > 0


def test_a_sliding_window_model_on_the_sequential_runner_keeps_generates_output_and_serves_on(model_dirs,
                                                                                                make_engine):
    """A sliding window drops old positions from the sequential runner's cache itself, so a rejected proposal's
    could not be cut back past the window (the engine died at the first rejection): such a model is not
    speculated."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = model_dirs["qwen2"]

    def load():  # the tiny qwen2 with an 8-token window in every layer
        config = AutoConfig.from_pretrained(path, use_sliding_window=True, sliding_window=8, max_window_layers=0)
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers
        return AutoModelForCausalLM.from_pretrained(path, config=config).eval()

    tokenizer = AutoTokenizer.from_pretrained(path)
    # Prompts that repeat themselves: a proposal from the first decode on, past the window.
    prompt_ids = [tokenizer(p)["input_ids"] for p in MORE_PROMPTS[-4:-1]]
    expected = [hf_greedy(load(), ids, 40) for ids in prompt_ids]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4, batching="sequential")
    results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=40) for ids in prompt_ids])
    assert [tokens for tokens, _ in results] == expected
    assert {final.finish_reason for _, final in results} == {"length"} and engine.error is None
    assert spec_counts(engine) == (0, 0)


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


def test_logprobs_and_penalized_requests_are_not_speculated(copying, make_engine):
    load, tokenizer, successor, _ = copying
    prompt = cycle_from(successor, 11, 40) + [11]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4)
    run_together(engine, [request(prompt_token_ids=prompt, max_tokens=20, logprobs=1),
                          GenerateRequest(request_id=f"s{next(_ids)}", prompt_token_ids=prompt, max_tokens=20,
                                          temperature=0.8, seed=3, repetition_penalty=1.2)])
    assert spec_counts(engine) == (0, 0)


@pytest.mark.parametrize("model_process", [False, True])
def test_seeded_sampled_requests_speculate_and_draw_the_tokens_they_draw_without(copying, model_process,
                                                                               make_engine):
    """Each verified position's token is drawn with its output index's seed, as without speculation, and the
    proposal kept while it matches: rejection sampling for a draft sure of its token (accepted with probability
    p(token), else drawn from p without it), with exactly the random numbers of decoding one by one. Temperature 12
    leaves the copying model's next token ~0.6 likely: proposals are both accepted and rejected."""
    load, tokenizer, successor, _ = copying
    document = cycle_from(successor, 200, 80)
    prompt = document + document[:1]

    def sampled(seed: int) -> GenerateRequest:
        return GenerateRequest(request_id=f"s{next(_ids)}", prompt_token_ids=prompt, max_tokens=40, seed=seed,
                               temperature=12.0, top_k=200, top_p=0.95, min_p=0.001, ignore_eos=True)

    plain = make_engine(load(), tokenizer)
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4, model_process=model_process)
    off = run_together(plain, [sampled(seed) for seed in range(8)])
    on = run_together(engine, [sampled(seed) for seed in range(8)])
    assert [tokens for tokens, _ in on] == [tokens for tokens, _ in off]
    proposed, accepted = spec_counts(engine)
    assert 0 < accepted < proposed


@pytest.mark.parametrize("model_process", [False, True])
def test_a_thinking_budget_speculates_and_ends_its_thinking_at_the_budget(copying, model_process, make_engine):
    """A budget without a grammar leaves the logits as they are, so the request speculates (its proposals copying
    the prompt are accepted); the end marker still lands exactly after `budget` thinking tokens, inside a proposal
    that the verification cuts there, and greedy and seeded sampled requests give the tokens they give without."""
    load, tokenizer, successor, _ = copying
    stretch = cycle_from(successor, 500, 200)
    document, end, budget = stretch[:120], stretch[150], 21
    prompt = document + document[:1]

    def thinker(**fields) -> GenerateRequest:
        return GenerateRequest(request_id=f"s{next(_ids)}", prompt_token_ids=prompt, max_tokens=40, ignore_eos=True,
                               thinking=Thinking(end_token_id=end, budget=budget), **fields)

    cases = [{"temperature": 0}, *[{"temperature": 1.0, "seed": seed} for seed in range(3)]]
    plain = make_engine(load(), tokenizer)
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=5, model_process=model_process)
    off = run_together(plain, [thinker(**fields) for fields in cases])
    on = run_together(engine, [thinker(**fields) for fields in cases])
    assert [tokens for tokens, _ in on] == [tokens for tokens, _ in off]
    assert off[0][0] == document[1:budget + 1] + [end] + cycle_from(successor, successor[end], 40 - budget - 1)
    assert all(tokens.index(end) == budget for tokens, _ in on)
    proposed, accepted = spec_counts(engine)
    assert 0 < accepted < proposed  # speculated, and a proposal crossing the budget cut there


BUDGETS = [6, 9, 13, 16, 20, 27]


def _thinkers_copying_every_4th_token_changed(successor, lead: int = 0):
    """(stretch, end marker, thinkers(**fields)): budget requests (BUDGETS) whose proposals copy a prompt with every
    4th token changed, so speculative steps and rows the model process chooses alternate; after `lead` tokens the
    prompt does not hold (lookups that find nothing, which back a request off)."""
    stretch = cycle_from(successor, 500, 200)
    document = [t if i % 4 else (t * 7 + 1) % len(successor) for i, t in enumerate(stretch[lead:lead + 120])]
    end = stretch[150]

    def thinkers(**fields) -> list[GenerateRequest]:
        return [GenerateRequest(request_id=f"s{next(_ids)}", prompt_token_ids=document + stretch[:1], max_tokens=40,
                                ignore_eos=True, thinking=Thinking(end_token_id=end, budget=budget), **fields)
                for budget in BUDGETS]

    return stretch, end, thinkers


def test_a_speculating_thinking_budget_seeds_the_model_process_once_and_then_sends_only_the_tokens_taken(
        copying, make_engine):
    """Its proposals copy a prompt with every 4th token changed, so speculative steps and rows the model process
    chooses alternate, the budget spent in either: after a speculative commit the model process's state gets the
    tokens taken since (StepBatch.state_tokens), its state seed (all the request's ids) going down once per request;
    the end marker still lands after exactly `budget` thinking tokens, greedy and sampled as without speculation."""
    load, tokenizer, successor, _ = copying
    stretch, end, thinkers = _thinkers_copying_every_4th_token_changed(successor)
    plain = make_engine(load(), tokenizer)
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=5, model_process=True)
    batches = []
    make_batch = engine._batch
    engine._batch = lambda chunks: batches.append(make_batch(chunks)) or batches[-1]
    for fields in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        off, on = run_together(plain, thinkers(**fields)), run_together(engine, thinkers(**fields))
        assert [tokens for tokens, _ in on] == [tokens for tokens, _ in off]
        assert [tokens.index(end) for tokens, _ in on] == BUDGETS
    assert off[0][0][:6] == stretch[1:7]
    seeded = [seq_id for batch in batches for seq_id in batch.state_seeds]
    assert len(seeded) == len(set(seeded)) == 2 * len(BUDGETS)  # once per request
    assert sum(len(batch.state_tokens) for batch in batches) >= len(BUDGETS)
    proposed, accepted = spec_counts(engine)
    assert 0 < accepted < proposed


def test_a_speculating_thinking_budget_keeps_its_tokens_and_budget_after_a_step_that_ran_out_of_memory(
        copying, make_engine, tmp_path):
    """A step runs out of memory in the model process after its TokenStates took what it sent but before any row
    chose a token (the newest request preempted, the others retried); a request backed off from looking up proposals
    retries it as a speculative step. The engine counts none of the failed rows as taken, so the row after that
    speculative step leaves no token out of the model process's state: tokens equal the engine's without
    speculation, the end marker after exactly `budget` thinking tokens (a token late or in the answer otherwise)."""
    load, tokenizer, successor, _ = copying
    _, end, thinkers = _thinkers_copying_every_4th_token_changed(successor, lead=8)
    plain, flag, failed = make_engine(load(), tokenizer), tmp_path / "fail-this-step", []

    def speculates_at_a_retry(engine: Engine, batch) -> bool:
        """Whether a request choosing a row of this step (backed off: not due to look up a proposal now) has a
        proposal at its ids (with the copy of its last one that a step sent ahead feeds) and is due at the next
        step: retried, it speculates."""
        running = {req.seq_id: req for req in engine._running}
        for chunk, choice in zip([c for c in batch.chunks if c.want_logits], batch.choices):
            req = running[chunk.seq_id]
            ids = req.all_ids + ([successor[req.all_ids[-1]]] if chunk.previous_row is not None else [])
            if choice is not None and req.speculation.due(engine._spec_step + 1) and engine.proposer.propose(ids, 5):
                return True
        return False

    def failing_at_a_step_retried_speculatively() -> Engine:
        model = load()
        run_out_of_memory_at_flagged_steps(model, str(flag))
        engine = make_engine(model, tokenizer, speculative_ngram_tokens=5, model_process=True, fast_path=False)
        launch = engine.runner.launch

        def launch_failing(batch) -> None:
            if not failed and len(batch.chunks) > 1 and speculates_at_a_retry(engine, batch):
                failed.append(batch)
                flag.write_text(json.dumps(sorted(chunk.start + i for chunk in batch.chunks
                                                  for i in range(len(chunk.token_ids)))))
            launch(batch)

        engine.runner.launch = launch_failing
        return engine

    for fields in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        failed.clear()
        engine = failing_at_a_step_retried_speculatively()
        off, on = run_together(plain, thinkers(**fields)), run_together(engine, thinkers(**fields))
        assert failed and not flag.exists()  # the step chosen ran out of memory in the model process
        assert engine.metrics.preemptions._value.get() == 1
        assert [tokens for tokens, _ in on] == [tokens for tokens, _ in off]
        assert [tokens.index(end) for tokens, _ in on] == BUDGETS


def test_the_sampled_acceptance_rule_matches_its_closed_form_on_given_logits():
    """Three fed positions' logits, a proposal [x1, x2]; over 4000 fixed seeds: the first token is x1 with probability
    p1(x1) and otherwise y with p1(y) / (1 - p1(x1)); after x1, the second is x2 with p2(x2), and p2 in all. Total
    variation within a bound the fixed seeds meet (deterministic: not a flaky statistical test)."""
    rows = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0, -3.0], [0.3, 1.0, 1.2, -0.5, 0.0, 0.1], [0.0] * 6])
    proposal = [1, 2]
    first, second = [], []
    for seed in range(4000):
        params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95, min_p=0.02, seed=seed)
        tokens = verify_proposal(proposal, lambda at: sample_token(rows[at], params, 7 + at))
        first.append(tokens[0])
        if tokens[0] == proposal[0]:
            second.append(tokens[1])
    p1, p2 = (sampling_probs(row, SamplingParams(temperature=0.9, top_k=5, top_p=0.95, min_p=0.02)) for row in rows[:2])
    assert p1[1] < 0.5 and p2[2] < 0.5 and p1[5] == 0  # proposals rejected often; top-k/top-p cut tokens

    def total_variation(drawn: list[int], probs: torch.Tensor) -> float:
        counts = torch.bincount(torch.tensor(drawn), minlength=len(probs)).float()
        return 0.5 * float((counts / len(drawn) - probs).abs().sum())

    rejected = [t for t in first if t != proposal[0]]
    residual = p1.clone()
    residual[proposal[0]] = 0
    assert abs(first.count(proposal[0]) / len(first) - float(p1[1])) < 0.02  # accepted with probability p1(x1)
    assert total_variation(rejected, residual / residual.sum()) < 0.03  # else p1 without x1, renormalized
    assert total_variation(first, p1) < 0.03 and total_variation(second, p2) < 0.06


def test_a_request_whose_proposals_are_always_rejected_stops_proposing(copying, make_engine):
    """Its prompt holds each pair of the output's successive tokens followed by another token: every lookup
    matches and every proposal is rejected at its first position. Proposing k=4 at each of its ~100 decodes would
    verify ~400 tokens; it backs off after a few (SpeculationRecord) and probes one token now and then."""
    load, tokenizer, successor, reference = copying
    heads = cycle_from(successor, 900, 110)
    prompt = [t for head in heads for t in (head, successor[head], (head * 7 + 3) % len(successor))] + heads[:1]
    expected = hf_greedy(reference, prompt, 100)
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4)
    [(tokens, _)] = run_together(engine, [request(prompt_token_ids=prompt, max_tokens=100)])
    assert tokens == expected == heads[1:101]
    proposed, accepted = spec_counts(engine)
    assert accepted == 0 and 0 < proposed <= 80


@pytest.mark.parametrize("model_process", [False, True])
def test_eight_copying_requests_keep_speculating(copying, model_process, make_engine):
    load, tokenizer, successor, reference = copying
    prompts = [cycle_from(successor, start, 60) + [start] for start in range(100, 900, 100)]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=4, model_process=model_process)
    results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=50) for ids in prompts])
    assert [tokens for tokens, _ in results] == [ids[1:51] for ids in prompts]
    proposed, accepted = spec_counts(engine)
    assert accepted == proposed and accepted >= 0.7 * 8 * 50  # most tokens came from accepted proposals


def test_the_acceptance_record_sizes_proposals_by_batch_and_backs_off_where_they_do_not_pay():
    record = SpeculationRecord()
    assert record.length(4, decodes=1) == 4 > record.length(4, decodes=8) > 0  # a new request speculates at once
    for _ in range(3):
        record.observe(proposed=4, accepted=1, tokens=4, decodes=1)  # 1 of 2 verified positions accepted each time
    assert record.length(4, decodes=1) > record.length(4, decodes=4) > 0  # a busier step pays for fewer positions
    assert record.length(4, decodes=8) == 0  # and at 8 decodes for none: the chunk's own cost is not earned back
    assert record.backoff == 1 and all(record.due(step) for step in range(5))
    backoffs = []
    for _ in range(6):  # rejected probes at 8 decodes a step
        record.observe(proposed=1, accepted=0, tokens=4, decodes=8)
        backoffs.append(record.backoff)
    assert backoffs == [2, 4, 8, 16, 16, 16] and MAX_BACKOFF_STEPS == 16
    assert record.due(32) and not record.due(33)  # backed-off requests look up at the same steps
    while record.backoff > 1:  # its output starts to copy: every probe accepted
        record.observe(proposed=1, accepted=1, tokens=4, decodes=8)
    assert record.length(4, decodes=8) > 0 and record.length(4, decodes=1) == 4
    for _ in range(LOOKUP_MISSES - 1):  # lookups that find nothing: a few in a row are not enough to back off
        record.missed()
    assert record.backoff == 1
    for _ in range(6):
        record.missed()
    assert record.backoff == MAX_LOOKUP_BACKOFF_STEPS == 8


def test_a_watched_proposal_is_scored_against_the_ids_decoded_after_it():
    record = SpeculationRecord(accepted=0.5, verified=1.0)
    record.watch([5, 6, 7], at=2)
    record.score_watched([1, 2, 5, 6], tokens=4, decodes=8)  # matching so far: not scored yet
    assert record.watched and record.rate == 0.5
    record.score_watched([1, 2, 5, 6, 9, 4], tokens=4, decodes=8)  # 2 accepted, the third rejected
    assert not record.watched and record.rate == (0.5 + 0.25 * (2 - 0.5)) / (1 + 0.25 * (3 - 1))


def test_the_worker_config_key_is_on_by_default_and_refuses_negatives():
    assert WorkerConfig().speculative_ngram_tokens == 5
    with pytest.raises(ValueError, match="speculative_ngram_tokens"):
        WorkerConfig(speculative_ngram_tokens=-1)


@pytest.mark.parametrize("model_process", [False, True])
def test_verifications_of_different_lengths_beside_decodes_and_prefill_chunks_keep_every_output(copying, model_process,
                                                                                                 make_engine):
    """Steps that hold plain decodes, verifications of different lengths (attended in the decodes' grouped call)
    and prefill chunks: each request's output is what it decodes alone, one token per step. (The logits of such a
    step, position by position, on models whose attention counts: test_batching.py.)"""
    load, tokenizer, successor, _ = copying
    copies = [cycle_from(successor, start, 60) + [start] for start in (100, 300)]
    partial = cycle_from(successor, 500, 60)
    partial = [t if i % 3 else (t * 7 + 1) % len(successor) for i, t in enumerate(partial)] + partial[:1]
    random_ids = [(17 * i + 5) % len(successor) for i in range(30)]
    long_prompts = [cycle_from(successor, start, 150) for start in (700, 800)]  # prefilled 16 tokens a step
    # In this order: the random prompt's plain decodes run beside the others' prefill chunks and verifications.
    prompts = [random_ids] + copies + [partial] + long_prompts
    lengths = [60, 40, 23, 40, 20, 20]
    # The rewired model's greedy output (generate stops at the end-of-text token the random prompt reaches).
    expected = [cycle_from(successor, ids[-1], n + 1)[1:] for ids, n in zip(prompts, lengths)]
    engine = make_engine(load(), tokenizer, speculative_ngram_tokens=5, model_process=model_process,
                         prefill_chunk_tokens=16)
    steps = []
    make_batch = engine._batch

    def recording(chunks):
        batch = make_batch(chunks)
        steps.append([(len(c.token_ids), c.start, c.logits_positions) for c in batch.chunks])
        return batch

    engine._batch = recording
    results = run_together(engine, [request(prompt_token_ids=ids, max_tokens=n) for ids, n in zip(prompts, lengths)])
    assert [tokens for tokens, _ in results] == expected

    def mixed(step) -> bool:
        verifications = {tokens for tokens, start, rows in step if rows > 1}
        return (len(verifications) >= 2 and any(tokens == 1 and start > 0 for tokens, start, _ in step)
                and any(tokens > 1 and rows == 1 for tokens, _, rows in step))

    assert any(mixed(step) for step in steps), steps


def test_a_partly_copying_request_verifies_a_short_proposal_beside_seven_other_decodes():
    """62% of its verified positions accepted (an output copying its prompt with every 4th token changed: the bench's
    partial workload): beside 7 other decodes one proposed token pays, since a verification shares the decodes'
    attention call (its own cost 0.025 per other decode; at 0.07, attended on its own, it was only watched)."""
    record = SpeculationRecord(accepted=0.62, verified=1.0)
    assert record.length(5, decodes=1) == 5 and record.length(5, decodes=8) == 1
    assert record.length(5, decodes=16) == 0  # beside 15 it still does not pay
