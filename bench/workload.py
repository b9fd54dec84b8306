"""A seeded serverless-LLM workload: which model is asked when, with how many prompt and output tokens.

    python bench/workload.py [--models 100] [--rate 2] [--duration 1800] [--arrivals gamma --cv 4]
                             [--zipf 1.1] [--lengths conversation|code|dev] [--seed 0] [--out trace.json]

Independent of hpcllm (numpy only): bench/simulate.py and bench/replay.py both read its trace, so the same requests
go through the simulation and the real dev cluster.

The shapes follow the public traces ServerlessLLM (OSDI'24) and its successors replay:

- **Arrivals** (Azure Functions trace 2019, Shahrad et al., "Serverless in the Wild", ATC'20): each model is a
  function with its own arrival process. `poisson`: exponential inter-arrival times (coefficient of variation 1),
  what ServerlessLLM's own experiments drive at a fixed request rate. `gamma`: gamma-distributed inter-arrival
  times with coefficient of variation `--cv` (shape 1/cv^2): at cv > 1 requests come in bursts separated by long
  silences, as most functions in the Azure trace do (their inter-arrival CV is above 1 for the majority of
  frequently invoked functions); the mean rate is unchanged.
- **Popularity** (same trace: invocation counts per function span 8 orders of magnitude, a small fraction of
  functions gets most invocations): model k of the popularity order gets a share proportional to 1/k^s (Zipf,
  `--zipf` s, 1.1 by default); which model is popular is drawn independently of its size.
- **Model sizes**: ServerlessLLM's model set (OPT 6.7B-66B, LLaMA-2 7B-70B) as four classes of fp16 checkpoints,
  each with the GPUs one instance needs: 7B (13.5 GB, 1 GPU, half the models), 13B (26 GB, 1 GPU, 30%), 34B
  (68 GB, 2 GPUs, 15%), 70B (140 GB, 4 GPUs, 5%).
- **Lengths** (Azure LLM inference trace 2023, Patel et al., "Splitwise", ISCA'24): prompt and output tokens are
  lognormal around the trace's medians, clipped to [min, max]: `conversation` prompts median 1020 tokens, outputs
  median 129; `code` prompts median 1500, outputs median 13 (sigma 0.9 / 0.8: the traces' long right tails).
  `dev` keeps the conversation shape scaled to what the dev cluster's small CPU models serve in minutes
  (prompts median 60, max 400; outputs median 16, max 64).

Output: JSON {"params": ..., "models": [{name, size_bytes, gpus, size_class, popularity_rank, share}],
"requests": [{id, t, model, prompt_tokens, output_tokens}]} sorted by arrival time t (seconds from 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GB = 10**9

# (class, checkpoint bytes in fp16, GPUs per instance, share of the models)
SIZE_CLASSES = (("7b", int(13.5 * GB), 1, 0.50), ("13b", 26 * GB, 1, 0.30), ("34b", 68 * GB, 2, 0.15),
                ("70b", 140 * GB, 4, 0.05))

# name: (prompt median, prompt sigma, prompt min, prompt max, output median, output sigma, output min, output max)
LENGTHS = {
    "conversation": (1020, 0.9, 16, 8192, 129, 0.8, 1, 2048),
    "code": (1500, 0.9, 16, 8192, 13, 0.8, 1, 1024),
    "dev": (60, 0.9, 8, 400, 16, 0.8, 1, 64),
}


@dataclass(frozen=True)
class WorkloadParams:
    models: int = 100
    rate: float = 2.0  # requests per second over all models
    duration: float = 1800.0  # seconds of arrivals
    arrivals: str = "gamma"  # "poisson" | "gamma"
    cv: float = 4.0  # coefficient of variation of the gamma inter-arrival times
    zipf: float = 1.1
    lengths: str = "conversation"
    seed: int = 0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size_bytes: int
    gpus: int
    size_class: str
    popularity_rank: int  # 1 = the most requested
    share: float  # of all requests (expected)


@dataclass(frozen=True)
class Request:
    id: int
    t: float
    model: str
    prompt_tokens: int
    output_tokens: int


def check(params: WorkloadParams) -> None:
    """Bad parameters get a message saying what to fix."""
    problems = []
    if params.models < 1:
        problems.append("--models must be at least 1")
    if params.rate <= 0 or params.duration <= 0:
        problems.append("--rate and --duration must be positive")
    if params.arrivals not in ("poisson", "gamma"):
        problems.append(f"--arrivals must be poisson or gamma, not {params.arrivals!r}")
    if params.cv <= 0:
        problems.append("--cv must be positive")
    if params.zipf < 0:
        problems.append("--zipf must be >= 0 (0: uniform popularity)")
    if params.lengths not in LENGTHS:
        problems.append(f"--lengths must be one of {', '.join(LENGTHS)}, not {params.lengths!r}")
    if problems:
        raise ValueError("; ".join(problems))


def make_models(params: WorkloadParams, rng: np.random.Generator) -> list[ModelInfo]:
    """Models of the four size classes in their proportions; popularity ranks drawn independently of size."""
    counts = [round(share * params.models) for *_, share in SIZE_CLASSES]
    counts[0] += params.models - sum(counts)  # rounding: the smallest class takes the rest
    classes = [c for c, n in zip(SIZE_CLASSES, counts) for _ in range(n)]
    ranks = rng.permutation(params.models) + 1
    weights = 1.0 / np.arange(1, params.models + 1, dtype=float) ** params.zipf
    shares = weights / weights.sum()
    return [ModelInfo(f"m{i:03d}-{c[0]}", c[1], c[2], c[0], int(rank), float(shares[rank - 1]))
            for i, (c, rank) in enumerate(zip(classes, ranks))]


def arrival_times(rate: float, duration: float, params: WorkloadParams, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration) of one model's requests at mean `rate` per second."""
    if rate <= 0:
        return np.empty(0)
    expected = rate * duration
    n = int(expected + 6 * np.sqrt(expected) * max(1.0, params.cv) + 10)
    if params.arrivals == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    else:
        shape = 1.0 / params.cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    # A random phase, so bursty models do not all start with a request at time 0.
    times = np.cumsum(gaps) - gaps[0] * rng.uniform()
    while times[-1] < duration:  # rare: the draw ran short
        more = np.cumsum(rng.exponential(1.0 / rate, n)) + times[-1]
        times = np.concatenate([times, more])
    return times[(times >= 0) & (times < duration)]


def lognormal_tokens(median: float, sigma: float, low: int, high: int, n: int, rng: np.random.Generator):
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def generate(params: WorkloadParams) -> tuple[list[ModelInfo], list[Request]]:
    check(params)
    rng = np.random.default_rng(params.seed)
    models = make_models(params, rng)
    arrivals = [(t, m.name) for m in models for t in arrival_times(params.rate * m.share, params.duration, params, rng)]
    arrivals.sort()
    p_med, p_sig, p_lo, p_hi, o_med, o_sig, o_lo, o_hi = LENGTHS[params.lengths]
    prompts = lognormal_tokens(p_med, p_sig, p_lo, p_hi, len(arrivals), rng)
    outputs = lognormal_tokens(o_med, o_sig, o_lo, o_hi, len(arrivals), rng)
    requests = [Request(i, round(float(t), 6), name, int(p), int(o))
                for i, ((t, name), p, o) in enumerate(zip(arrivals, prompts, outputs))]
    return models, requests


def to_json(params: WorkloadParams, models: list[ModelInfo], requests: list[Request]) -> dict:
    return {"params": asdict(params), "models": [asdict(m) for m in models], "requests": [asdict(r) for r in requests]}


def load_trace(path: Path) -> tuple[WorkloadParams, list[ModelInfo], list[Request]]:
    data = json.loads(Path(path).read_text())
    return (WorkloadParams(**data["params"]), [ModelInfo(**m) for m in data["models"]],
            [Request(**r) for r in data["requests"]])


def summary(params: WorkloadParams, models: list[ModelInfo], requests: list[Request]) -> str:
    per_model: dict[str, int] = {}
    for r in requests:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    counts = sorted(per_model.values(), reverse=True)
    top = sum(counts[: max(1, len(models) // 10)])
    times = np.array([r.t for r in requests])
    gaps = np.diff(times) if len(times) > 1 else np.array([0.0])
    lines = [
        f"{len(requests)} requests over {params.duration:.0f} s ({len(requests) / params.duration:.2f}/s), "
        f"{len(per_model)} of {len(models)} models asked; {params.arrivals} arrivals"
        + (f" (cv {params.cv})" if params.arrivals == "gamma" else "") + f", zipf {params.zipf}, seed {params.seed}",
        f"top 10% of models get {100 * top / max(1, len(requests)):.0f}% of the requests; "
        f"inter-arrival cv (all models merged) {gaps.std() / max(gaps.mean(), 1e-9):.2f}",
        f"prompt tokens p50 {np.median([r.prompt_tokens for r in requests]):.0f} "
        f"p99 {np.percentile([r.prompt_tokens for r in requests], 99):.0f}; output tokens p50 "
        f"{np.median([r.output_tokens for r in requests]):.0f} "
        f"p99 {np.percentile([r.output_tokens for r in requests], 99):.0f}",
        "sizes: " + ", ".join(f"{c} x{sum(m.size_class == c for m in models)}" for c, *_ in SIZE_CLASSES),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, defaults: WorkloadParams = WorkloadParams()) -> None:
    parser.add_argument("--models", type=int, default=defaults.models)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="requests per second, all models")
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of arrivals")
    parser.add_argument("--arrivals", default=defaults.arrivals, help="poisson | gamma")
    parser.add_argument("--cv", type=float, default=defaults.cv, help="gamma inter-arrival coefficient of variation")
    parser.add_argument("--zipf", type=float, default=defaults.zipf, help="popularity exponent")
    parser.add_argument("--lengths", default=defaults.lengths, help=" | ".join(LENGTHS))
    parser.add_argument("--seed", type=int, default=defaults.seed)


def params_from(args: argparse.Namespace) -> WorkloadParams:
    return WorkloadParams(models=args.models, rate=args.rate, duration=args.duration, arrivals=args.arrivals,
                          cv=args.cv, zipf=args.zipf, lengths=args.lengths, seed=args.seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help="write the trace here (JSON)")
    args = parser.parse_args()
    params = params_from(args)
    try:
        models, requests = generate(params)
    except ValueError as exc:
        parser.error(str(exc))
    print(summary(params, models, requests))
    if args.out:
        args.out.write_text(json.dumps(to_json(params, models, requests)))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
