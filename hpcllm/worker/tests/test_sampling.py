import torch

from hpcllm.worker.sampling import SamplingParams, filter_top_k, sample_token, sampling_probs, step_seed, top_p_probs


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
