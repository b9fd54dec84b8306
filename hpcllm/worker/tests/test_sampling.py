import itertools

import torch

from hpcllm.worker.protocol import FLOAT32_MAX, FLOAT32_TINY
from hpcllm.worker.sampling import (SamplingParams, Thinking, ThinkingState, TokenCounts, TokenState, adjusted_logits,
                                    filter_top_k, forced_or, sample_token, sampling_probs, step_seed, top_p_probs,
                                    verify_proposal)


def test_step_seed_is_deterministic_and_differs_between_steps_and_seeds():
    assert step_seed(7, 3) == step_seed(7, 3)
    assert len({step_seed(7, i) for i in range(100)}) == 100
    assert step_seed(7, 0) != step_seed(8, 0)
    assert all(0 <= step_seed(2**63 - 1, i) < 2**63 for i in range(10))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    kept = top_p_probs(probs, 0.7)  # 0.5 + 0.3 reaches 0.7
    assert torch.allclose(kept, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert torch.allclose(top_p_probs(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(top_p_probs(probs, 1e-9), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(top_p_probs(probs, 1.0), probs)


def test_top_k_masks_all_but_the_k_largest():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.equal(torch.isfinite(filter_top_k(logits, 2)), torch.tensor([False, True, True, False]))
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_sampled_tokens_stay_inside_the_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0, top_p=0.6, seed=1)
    drawn = {sample_token(logits, params, i) for i in range(300)}
    assert drawn == {0, 1}


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.zeros(50)
    draws = lambda seed: [sample_token(logits, SamplingParams(temperature=1.0, seed=seed), i) for i in range(40)]
    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_temperature_zero_is_argmax_and_low_temperature_sharpens():
    logits = torch.tensor([0.1, 2.0, 1.9])
    assert sample_token(logits, SamplingParams(temperature=0.0), 0) == 1
    cold = sampling_probs(logits, SamplingParams(temperature=0.05))
    hot = sampling_probs(logits, SamplingParams(temperature=5.0))
    assert cold[1] > 0.85 and hot[1] < 0.4


def test_extreme_top_p_and_temperature_choose_the_most_likely_token():
    logits = torch.tensor([0.1, 2.0, 1.9])
    assert top_p_probs(torch.softmax(logits, -1), 1e-300).tolist() == [0.0, 1.0, 0.0]
    for params in (SamplingParams(top_p=1e-300, seed=3), SamplingParams(temperature=1e-40, seed=3),
                   SamplingParams(temperature=1e-320, seed=3)):
        assert sample_token(logits, params, 0) == 1, params


# ---- logit bias, penalties, min_p against vLLM's formulas ----------------------------------------------------------


def vllm_reference_logits(logits, prompt_ids, output_ids, *, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """vLLM's v1 sampler on one row, written as it is there: logit bias, then apply_penalties (bin counts and masks
    over a padded batch of one)."""
    vocab = logits.shape[-1]
    logits = logits.float().clone()[None]
    for token, value in (bias or {}).items():
        logits[0, token] += value
    prompt_mask = torch.zeros(1, vocab + 1, dtype=torch.long).scatter_add_(
        1, torch.tensor([prompt_ids]), torch.ones(1, len(prompt_ids), dtype=torch.long))[:, :vocab] > 0
    padded_output = output_ids or [vocab]  # vLLM pads with vocab_size, a column cut off below
    output_counts = torch.zeros(1, vocab + 1, dtype=torch.long).scatter_add_(
        1, torch.tensor([padded_output]), torch.ones(1, len(padded_output), dtype=torch.long))[:, :vocab]
    output_mask = output_counts > 0
    penalties = torch.tensor([repetition])[:, None].repeat(1, vocab)
    penalties = torch.where(prompt_mask | output_mask, penalties, 1.0)
    logits *= torch.where(logits > 0, 1.0 / penalties, penalties)
    logits -= torch.tensor([frequency])[:, None] * output_counts
    logits -= torch.tensor([presence])[:, None] * output_mask
    return logits[0]


def vllm_reference_min_p(logits, min_p):
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def penalized(vocab, prompt_ids, output_ids, **fields):
    params = SamplingParams(**fields)
    return params, TokenState.build(params, vocab, prompt_ids, output_ids)


def test_bias_and_penalties_equal_vllms_formulas_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    vocab = 64
    for trial in range(30):
        logits = torch.randn(vocab, generator=generator) * 4
        prompt_ids = torch.randint(0, vocab, (12,), generator=generator).tolist()
        output_ids = torch.randint(0, vocab, (trial,), generator=generator).tolist()  # none in the first trial
        presence, frequency = (torch.rand(2, generator=generator) * 4 - 2).tolist()
        repetition = float(torch.rand(1, generator=generator) * 2 + 0.1)
        bias = {int(t): float(b) for t, b in zip(torch.randint(0, vocab, (5,), generator=generator),
                                                  torch.rand(5, generator=generator) * 200 - 100)}
        params, counts = penalized(vocab, prompt_ids, output_ids, presence_penalty=presence,
                                   frequency_penalty=frequency, repetition_penalty=repetition,
                                   logit_bias=tuple(bias.items()))
        expected = vllm_reference_logits(logits, prompt_ids, output_ids, presence=presence, frequency=frequency,
                                         repetition=repetition, bias=bias)
        assert torch.allclose(adjusted_logits(logits, params, counts), expected, atol=1e-5), trial
        greedy = SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency,
                                repetition_penalty=repetition, logit_bias=tuple(bias.items()))
        assert sample_token(logits, greedy, 0, counts) == int(torch.argmax(expected))


def test_token_counts_updated_per_token_equal_counts_built_from_the_ids():
    """A resumed or migrated request builds its counts from its ids: they must equal the counts an uninterrupted
    request reached token by token, or its tokens would differ."""
    prompt_ids, output_ids = [3, 5, 5, 9], [1, 5, 1, 7, 1]
    grown = TokenCounts(16, prompt_ids, [])
    for token in output_ids:
        grown.add(token)
    built = TokenCounts(16, prompt_ids, output_ids)
    assert torch.equal(grown.output, built.output) and torch.equal(grown.in_prompt, built.in_prompt)
    assert built.output[1] == 3 and built.output[5] == 1 and built.output[3] == 0  # output only: 3, 9 in the prompt
    assert built.in_prompt.nonzero().flatten().tolist() == [3, 5, 9]


def test_frequency_and_presence_penalize_output_tokens_only_and_repetition_prompt_ones_too():
    logits = torch.tensor([2.0, -2.0, 2.0, 1.0])
    params, counts = penalized(4, [0, 1], [2, 2], frequency_penalty=0.5, presence_penalty=0.25)
    assert adjusted_logits(logits, params, counts).tolist() == [2.0, -2.0, 2.0 - 2 * 0.5 - 0.25, 1.0]
    params, counts = penalized(4, [0, 1], [2, 2], repetition_penalty=2.0)
    assert adjusted_logits(logits, params, counts).tolist() == [1.0, -4.0, 1.0, 1.0]


def test_min_p_after_temperature_equals_vllms_and_keeps_only_tokens_near_the_most_likely():
    generator = torch.Generator().manual_seed(1)
    for min_p in (0.05, 0.3, 0.9):
        for temperature in (0.5, 1.0, 2.0):
            logits = torch.randn(40, generator=generator) * 3
            probs = sampling_probs(logits, SamplingParams(temperature=temperature, min_p=min_p))
            expected = torch.softmax(vllm_reference_min_p(logits / temperature, min_p), dim=-1)
            assert torch.allclose(probs, expected, atol=1e-6)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    drawn = {sample_token(logits, SamplingParams(temperature=1.0, min_p=0.5, seed=2), i) for i in range(300)}
    assert drawn == {0, 1}  # 0.15 and 0.05 are below half the top probability
    assert sampling_probs(logits, SamplingParams(min_p=0.0)).gt(0).all()


def test_logit_bias_forces_or_bans_a_token_and_leaves_the_callers_logits_alone():
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0])
    kept = logits.clone()
    assert sample_token(logits, SamplingParams(temperature=0.0, logit_bias=((3, 100.0),)), 0) == 3
    assert sample_token(logits, SamplingParams(temperature=0.0, logit_bias=((0, -100.0),)), 0) == 1
    banned = {sample_token(logits, SamplingParams(temperature=1.0, seed=4, logit_bias=((0, -100.0), (1, -100.0))), i)
              for i in range(200)}
    assert banned == {2, 3}
    params, counts = penalized(4, [0], [0, 1], repetition_penalty=3.0, frequency_penalty=1.0, logit_bias=((2, 5.0),))
    sample_token(logits, params, 0, counts)
    assert torch.equal(logits, kept)  # the engine's logprobs are computed from the same tensor


def test_the_apis_extreme_repetition_penalties_with_a_logit_bias_still_choose_a_token():
    """The smallest repetition penalty the API takes divides a biased prompt token's logit past float32 (inf), the
    largest multiplies negative ones past it (-inf); sampling met NaN (inf - inf, or only -inf) and the request ended
    with an error. Such a row is computed in float64: the biased token is chosen at any temperature, and where every
    token is pushed down the draw is still a token."""
    favoured = torch.tensor([1.0, 2.0, -1.0, 0.5])
    pushed_down = torch.tensor([-1.5, -2.0, -3.0, 0.5])
    for temperature in (0.0, 1e-4, 0.7, 1.0, 100.0):
        params, state = penalized(4, [0, 1, 2], [], repetition_penalty=FLOAT32_TINY, logit_bias=((0, 100.0),),
                                  temperature=temperature, seed=5)
        assert {sample_token(favoured, params, i, state) for i in range(20)} == {0}, temperature
        params, state = penalized(4, [0, 1, 2, 3], [], repetition_penalty=FLOAT32_MAX, logit_bias=((3, -100.0),),
                                  temperature=temperature, seed=5)
        assert all(0 <= sample_token(pushed_down, params, i, state) < 4 for i in range(20)), temperature


def test_logits_an_extreme_repetition_penalty_pushes_past_float32_keep_their_order():
    """Logits pushed past float32's range by the API's smallest (largest) repetition penalty all saturated at its
    largest (smallest) number, tied: greedy took the first of them and sampling drew among them, where the exact
    arithmetic puts one above the others (5 + 0 vs 1 + 100 divided by the same penalty: the biased token). So for
    logits it takes below float32's smallest numbers."""
    for temperature in (0.0, 1e-4, 1.0, 100.0):
        params, state = penalized(4, [0, 1, 2], [], repetition_penalty=FLOAT32_TINY, logit_bias=((1, 100.0),),
                                  temperature=temperature, seed=5)
        assert {sample_token(torch.tensor([5.0, 1.0, -1.0, 0.5]), params, i, state) for i in range(20)} == {1}
        params, state = penalized(4, [0, 1, 2, 3], [], repetition_penalty=FLOAT32_MAX, temperature=temperature,
                                  seed=5)
        assert {sample_token(torch.tensor([-2.0, -1.5, -3.0, -2.5]), params, i, state) for i in range(20)} == {1}
    # The largest penalty takes small positive logits below float32's smallest numbers: rounded to 0 they tied and
    # greedy took token 0 (differences that small are no difference to a sampled draw, only to the argmax).
    params, state = penalized(3, [0, 1, 2], [], repetition_penalty=FLOAT32_MAX, temperature=0.0)
    assert sample_token(torch.tensor([1e-8, 2e-8, -1.0]), params, 0, state) == 1


def test_rows_an_extreme_penalty_leaves_in_float32_are_chosen_as_before():
    """Only a row whose penalties overflow float32 is computed in float64: another keeps its float32 logits and
    probabilities bit for bit (a seed draws the same tokens as before)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(64, generator=generator) * 4
    params, state = penalized(64, list(range(0, 64, 3)), [1, 2, 2], repetition_penalty=1.3, frequency_penalty=0.4,
                              logit_bias=((7, 12.5),), temperature=0.8, seed=9)
    adjusted = adjusted_logits(logits, params, state)
    expected = vllm_reference_logits(logits, list(range(0, 64, 3)), [1, 2, 2], frequency=0.4, repetition=1.3,
                                     bias={7: 12.5})
    assert adjusted.dtype == torch.float32 and torch.equal(adjusted, expected)
    assert torch.equal(sampling_probs(logits, params, state), torch.softmax((expected - expected.max()) / 0.8, -1))


def test_which_parameters_need_the_history_and_which_leave_the_raw_argmax():
    assert SamplingParams(temperature=0.0).raw_argmax
    assert SamplingParams(temperature=0.0, min_p=0.5).raw_argmax  # min_p keeps the most likely token
    assert not SamplingParams(temperature=0.0, logit_bias=((1, 1.0),)).raw_argmax
    for fields in ({"presence_penalty": 0.1}, {"frequency_penalty": -0.1}, {"repetition_penalty": 1.1}):
        params = SamplingParams(temperature=0.0, **fields)
        assert params.penalized and not params.raw_argmax
    assert not SamplingParams(logit_bias=((1, 1.0),), min_p=0.2).penalized
    # A thinking budget alone keeps a TokenState but leaves the logits as they are: the step's argmax, then forced_or.
    budget_only = SamplingParams(temperature=0.0, thinking=Thinking(end=9, budget=2))
    assert budget_only.reads_tokens and not budget_only.masks_logits and budget_only.raw_argmax
    with_grammar = SamplingParams(temperature=0.0, constrained=True, thinking=Thinking(end=9, budget=2))
    assert with_grammar.masks_logits and not with_grammar.raw_argmax


def test_a_spent_thinking_budget_replaces_the_chosen_token_by_its_end_marker_greedy_or_sampled():
    """Two thinking tokens, budget 2: the end marker whatever the logits favour (as masking every other token
    would choose it), without a look at them; the token after it is the logits' own again."""
    end, logits = 3, torch.tensor([5.0, 1.0, 0.0, -20.0])
    params = [SamplingParams(temperature=0.0, thinking=Thinking(end=end, budget=2)),
              SamplingParams(temperature=0.7, seed=1, thinking=Thinking(end=end, budget=2))]
    for p in params:
        state = TokenState.build(p, 4, [1], [0, 1])
        assert state.forced == end
        assert sample_token(logits, p, 2, state) == forced_or(state, 0) == end
        assert sample_token(torch.full((4,), float("nan")), p, 2, state) == end  # the logits are not read
        state.add(end)
        assert state.forced is None and forced_or(state, 0) == 0
    state = TokenState.build(params[0], 4, [1], [0])
    assert state.forced is None and sample_token(logits, params[0], 1, state) == 0  # one token left in the budget


def test_a_thinking_state_built_from_the_ids_equals_one_fed_token_by_token():
    """Built from a resumed output's ids at once (a seed in the model process, a speculation's verification) or
    fed one token at a time, it says the same: still thinking, the tokens thought, where the answer starts."""
    start, end = 7, 8
    outputs = [[], [7], [1, 2], [7, 1, 2], [7, 1, 8, 3, 8], [1, 8, 7], [8, 8], [7, 7, 1, 2, 3]]
    for rule in (Thinking(end=end), Thinking(end=end, start=start, budget=1)):
        for ids in outputs:
            fed = ThinkingState(rule, [])
            for token in ids:
                fed.add(token)
            built = ThinkingState(rule, ids)
            assert vars(built) == vars(fed), (rule, ids)
            built.add(end), fed.add(end)
            assert vars(built) == vars(fed), (rule, ids)


def test_a_kept_thinking_state_advanced_over_each_commits_tokens_equals_one_built_from_the_whole_output():
    """A speculating request keeps its ThinkingState and advances it over the tokens each commit takes (any number,
    across the opening, the budget's end and the end marker) instead of scanning its whole output again: at every
    point it says what one built from the output so far says."""
    start, end = 7, 8
    outputs = [[7, 1, 2, 3, 4, 8, 5, 6], [1, 2, 3, 4, 5, 6, 8, 1], [7, 7, 1, 8, 8, 2], [3, 8, 4, 7]]
    for rule in (Thinking(end=end), Thinking(end=end, budget=2), Thinking(end=end, start=start, budget=3)):
        for ids in outputs:
            for cuts in itertools.combinations(range(1, len(ids)), 2):
                kept = ThinkingState(rule, ids[:cuts[0]])
                for upto in (*cuts, len(ids)):
                    kept.advance(ids[:upto])
                    built = ThinkingState(rule, ids[:upto])
                    assert (vars(kept), kept.forced) == (vars(built), built.forced), (rule, ids, cuts, upto)


def test_a_speculated_thinking_request_gets_its_end_marker_at_the_budget_within_a_proposal():
    """Budget 3, two tokens thought: a proposal of four that the argmax confirms is cut at the third position,
    where the end marker replaces the argmax (rejecting the proposal there), as decoding one by one would; the
    caller's state is advanced through the tokens kept."""
    end, picks = 9, [4, 5, 6, 7, 1]
    thinking = ThinkingState(Thinking(end=end, budget=3), [1, 2])
    assert verify_proposal([4, 5, 6, 7], picks.__getitem__, thinking) == [4, end]
    assert not thinking.thinking and thinking.thought == 3
    assert verify_proposal([4, 5, 6, 7], picks.__getitem__) == [4, 5, 6, 7, 1]  # no budget: the whole proposal
    after = ThinkingState(Thinking(end=end, budget=3), [1, 2, 3, end])
    assert verify_proposal([4, 5, 6, 7], picks.__getitem__, after) == [4, 5, 6, 7, 1]  # the answer: not forced
