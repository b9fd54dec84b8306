"""bench/workload.py: the seeded trace generator the simulation and the replay share."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import workload  # noqa: E402
from workload import WorkloadParams, generate  # noqa: E402


def test_same_seed_same_trace_other_seed_other_trace():
    params = WorkloadParams(models=20, rate=1.0, duration=300, seed=3)
    assert generate(params) == generate(params)
    assert generate(params)[1] != generate(WorkloadParams(models=20, rate=1.0, duration=300, seed=4))[1]


def test_rate_popularity_and_lengths_have_the_documented_shape():
    models, requests = generate(WorkloadParams(models=50, rate=5.0, duration=2000, arrivals="poisson", seed=1))
    assert len(requests) == pytest.approx(10_000, rel=0.05)  # Poisson: count close to rate x duration
    assert all(0 <= r.t < 2000 for r in requests) and requests == sorted(requests, key=lambda r: r.t)
    by_rank = {m.name: m.popularity_rank for m in models}
    top = sum(1 for r in requests if by_rank[r.model] <= 5)
    assert top / len(requests) > 0.4  # zipf 1.1 over 50 models: the top 5 get about half
    prompts = np.array([r.prompt_tokens for r in requests])
    outputs = np.array([r.output_tokens for r in requests])
    assert np.median(prompts) == pytest.approx(1020, rel=0.1) and np.median(outputs) == pytest.approx(129, rel=0.1)
    assert {m.size_class for m in models} == {"7b", "13b", "34b", "70b"}


def test_gamma_arrivals_are_burstier_than_poisson_at_the_same_rate():
    def gap_cv(arrivals):
        models, requests = generate(WorkloadParams(models=1, rate=2.0, duration=5000, arrivals=arrivals, cv=4.0))
        gaps = np.diff([r.t for r in requests])
        return gaps.std() / gaps.mean(), len(requests)

    poisson_cv, _ = gap_cv("poisson")
    gamma_cv, n = gap_cv("gamma")
    assert poisson_cv == pytest.approx(1.0, abs=0.1)
    assert gamma_cv > 2.5 and n == pytest.approx(10_000, rel=0.35)


def test_bad_parameters_say_what_to_fix():
    with pytest.raises(ValueError, match="--arrivals must be poisson or gamma"):
        generate(WorkloadParams(arrivals="uniform"))
    with pytest.raises(ValueError, match="--lengths must be one of"):
        generate(WorkloadParams(lengths="long"))
    assert workload.LENGTHS["dev"][3] <= 400  # the dev profile fits the dev models' context
