"""Total variation to the exact power target against M, for each estimator, on toy models.

Run: python samples/bench_engine.py [--out bench-results/engine.json] [--seeds 3] [--repeats 500]

For each toy model, estimator and M, the sampler's exact sequence distribution
is the product of expected per-prefix decision probabilities, each averaged
over ``--repeats`` independent decisions. That average carries Monte Carlo
noise, so each figure is repeated over ``--seeds`` seeds and printed as a mean
with a 95% normal confidence half-width.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from psdiffusion.core import PowerSamplingConfig
from psdiffusion.toy import (
    TabularModel,
    exact_target,
    low_temperature_distribution,
    sampler_distribution,
    total_variation_dist,
)

ROLLOUT_COUNTS = (2, 4, 8, 16, 32)
ESTIMATORS = {
    "plain, T=1": dict(estimator="plain", rollout_proposal="base"),
    "jackknife, T=1": dict(estimator="jackknife", rollout_proposal="base"),
    "plain, T=1/alpha + normalisers": dict(estimator="plain", rollout_proposal="tempered"),
    "jackknife, T=1/alpha + normalisers": dict(estimator="jackknife", rollout_proposal="tempered"),
}
TOY_MODELS = {
    "V=3 H=4 alpha=3": (dict(vocab_size=3, horizon=4, concentration=2.0, seed=2), 3.0),
    "V=4 H=5 EOS alpha=2": (dict(vocab_size=4, horizon=5, eos_token=3, concentration=5.0, seed=1), 2.0),
}


def mean_and_half_width(values):
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def bench_model(name, model_kwargs, alpha, seeds, repeats):
    model = TabularModel(**model_kwargs)
    target = exact_target(model, alpha)
    low_tv = total_variation_dist(low_temperature_distribution(model, alpha), target)
    rows = {"low temperature T=1/alpha (exact, no rollouts)": {str(m): [low_tv, 0.0] for m in ROLLOUT_COUNTS}}
    for label, options in ESTIMATORS.items():
        rows[label] = {}
        for m in ROLLOUT_COUNTS:
            config = PowerSamplingConfig(num_candidates=model.vocab_size, num_rollouts=m, rollout_length=None,
                                         alpha=alpha, **options)
            distances = [
                total_variation_dist(sampler_distribution(model, config, repeats, torch.Generator().manual_seed(s)),
                                     target)
                for s in range(seeds)
            ]
            rows[label][str(m)] = list(mean_and_half_width(distances))
            print(f"  {name} | {label} | M={m}: TV {rows[label][str(m)][0]:.4f}", flush=True)
    return {"model": name, "alpha": alpha, "sequences": len(target), "tv": rows}


def print_table(result):
    print(f"\n{result['model']} ({result['sequences']} sequences): TV to the exact power target, mean ± 95% CI")
    header = f"{'estimator':44s}" + "".join(f"{'M=' + str(m):>17s}" for m in ROLLOUT_COUNTS)
    print(header)
    for label, by_m in result["tv"].items():
        cells = "".join(f"{by_m[str(m)][0]:>10.4f} ±{by_m[str(m)][1]:.4f}" for m in ROLLOUT_COUNTS)
        print(f"{label:44s}{cells}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="independent repetitions per figure")
    parser.add_argument("--repeats", type=int, default=500, help="decisions averaged per prefix")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    start = time.perf_counter()
    results = [bench_model(name, kwargs, alpha, args.seeds, args.repeats) for name, (kwargs, alpha) in TOY_MODELS.items()]
    for result in results:
        print_table(result)
    print(f"\n{time.perf_counter() - start:.0f} s, seeds={args.seeds}, repeats={args.repeats}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seeds": args.seeds, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
