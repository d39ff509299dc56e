"""Benchmark of the language-model path on SmolLM2-135M-Instruct: speed, fidelity, tasks and MCMC.

Sections (``--sections``, comma-separated):
  speed     the time of one power-sampling decision against the raw time of the same
            K*M*H batched decode steps from a prefilled cache, and rollout tokens per second;
  fidelity  mean total log p(x) and the bound alpha*E[log p] + H(q), from each sampler's
            own step log-probs, for sampling at T=1, at T=1/alpha, and power sampling;
  tasks     exact-match accuracy on generated arithmetic, sorting and letter-counting items,
            for every method at matched token budgets, with paired bootstrap intervals;
  mcmc      wall time for MCMC power sampling to reach the mean log p of rollout power sampling.

Prints figures and writes every number to ``--out`` (JSON). ``--quick`` shrinks every section.
Run: ``HF_HUB_OFFLINE=1 python samples/bench_lm.py --quick --out bench-results/lm.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm.tasks import extract_answer, fidelity_prompts, is_correct, make_items  # noqa: E402

from psdiffusion.core.config import PowerSamplingConfig  # noqa: E402
from psdiffusion.core.decision import Budget, decide  # noqa: E402
from psdiffusion.lm import build_adapter, load_model  # noqa: E402
from psdiffusion.lm.baselines import decode  # noqa: E402
from psdiffusion.lm.model_io import encode_prompt, fork_cache, forward_logits  # noqa: E402


def bootstrap_ci(values, seed=0, resamples=2000, level=0.95):
    """Mean and percentile bootstrap interval of ``values`` (paired differences go in as one array)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(values.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(len(values))}


def chat(text):
    return [{"role": "user", "content": text}]


# -- speed ---------------------------------------------------------------------------------------------------------

def raw_decode_steps(model, cache, next_logits, rows, steps, generator, sample_tokens):
    """Run the reference: ``steps`` batched decode steps of ``rows`` rows from a prefilled cache.

    With ``sample_tokens`` each step also draws the next token the way transformers' sampling
    does (softmax and ``torch.multinomial``); without, it feeds fixed tokens (forward passes only).
    """
    cache = fork_cache(cache, torch.zeros(rows, dtype=torch.long))
    logits = next_logits.expand(rows, -1)
    fixed = torch.full((rows, 1), 216, dtype=torch.long)
    for _ in range(steps):
        if sample_tokens:
            tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # (rows, 1)
        else:
            tokens = fixed
        logits, _ = forward_logits(model, tokens, cache)


def bench_speed(model, tokenizer, config, repeats):
    adapter = build_adapter(model, tokenizer)
    prompt_ids = encode_prompt(tokenizer, chat("Write a long story about a dragon who learns to paint."))
    state = adapter.prefill(prompt_ids, 256, Budget())
    K, M, H = config.num_candidates, config.num_rollouts, config.rollout_length
    generator = torch.Generator().manual_seed(0)

    times = {"decision": [], "forward_only": [], "sampling_decode": []}
    rollout_tokens = []
    for repeat in range(repeats + 1):
        budget = Budget()
        start = time.perf_counter()
        decide(adapter, state, config, generator, budget)
        decision_time = time.perf_counter() - start
        start = time.perf_counter()
        raw_decode_steps(model, state.cache, state.next_logits, K * M, H, generator, sample_tokens=False)
        forward_time = time.perf_counter() - start
        start = time.perf_counter()
        raw_decode_steps(model, state.cache, state.next_logits, K * M, H, generator, sample_tokens=True)
        sampling_time = time.perf_counter() - start
        if repeat == 0:
            continue  # warm-up
        times["decision"].append(decision_time)
        times["forward_only"].append(forward_time)
        times["sampling_decode"].append(sampling_time)
        rollout_tokens.append(budget.rollout_steps)

    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = statistics.median(rollout_tokens)
    result = {
        "K": K, "M": M, "H": H, "rollout_proposal": config.rollout_proposal, "repeats": repeats,
        "seconds": times, "median_seconds": medians,
        "ratio_vs_forward_only": medians["decision"] / medians["forward_only"],
        "ratio_vs_sampling_decode": medians["decision"] / medians["sampling_decode"],
        "rollout_tokens_per_decision": tokens,
        "rollout_tokens_per_second": tokens / medians["decision"],
    }
    print(f"speed ({config.rollout_proposal} rollouts): decision {medians['decision']:.3f} s; "
          f"{K}x{M}x{H} decode steps: forward only {medians['forward_only']:.3f} s "
          f"(ratio {result['ratio_vs_forward_only']:.3f}, goal <= 1.15), with multinomial sampling "
          f"{medians['sampling_decode']:.3f} s (ratio {result['ratio_vs_sampling_decode']:.3f}); "
          f"{result['rollout_tokens_per_second']:.0f} rollout tokens/s")
    return result


# -- fidelity ------------------------------------------------------------------------------------------------------

def bench_fidelity(model, tokenizer, config, prompts, max_new_tokens):
    methods = {
        "sample T=1": ("sample", {"temperature": 1.0}),
        "low-temp T=1/alpha": ("low-temp", {"alpha": config.alpha}),
        "power": ("power", {"config": config}),
    }
    per_method = {name: {"log_p": [], "bound_terms": [], "seconds": [], "tokens": []} for name in methods}
    for i, prompt in enumerate(prompts):
        for name, (method, options) in methods.items():
            generator = torch.Generator().manual_seed(1000 + i)
            result = decode(method, model, tokenizer, chat(prompt), max_new_tokens, generator, **options)
            record = per_method[name]
            record["log_p"].append(result.log_p)
            # alpha * log p(x) - log q(x): its mean over draws is alpha*E[log p] + H(q), a lower bound on log Z.
            # NOTE: power's log q sums log pi_hat of the chosen tokens, an estimate of its true step probabilities.
            record["bound_terms"].append(config.alpha * result.log_p - result.log_q)
            record["seconds"].append(result.budget.seconds)
            record["tokens"].append(result.budget.rollout_steps)
        print(f"  fidelity prompt {i + 1}/{len(prompts)}", file=sys.stderr)

    summary = {}
    for name, record in per_method.items():
        summary[name] = {"log_p": bootstrap_ci(record["log_p"]), "bound": bootstrap_ci(record["bound_terms"]),
                         "mean_seconds": float(np.mean(record["seconds"])),
                         "mean_sampled_tokens": float(np.mean(record["tokens"]))}
        print(f"fidelity {name:20s} mean log p {summary[name]['log_p']['mean']:8.2f} "
              f"[{summary[name]['log_p']['ci_low']:.2f}, {summary[name]['log_p']['ci_high']:.2f}]  "
              f"bound {summary[name]['bound']['mean']:8.2f} "
              f"[{summary[name]['bound']['ci_low']:.2f}, {summary[name]['bound']['ci_high']:.2f}]")
    power, low = per_method["power"], per_method["low-temp T=1/alpha"]
    summary["power_minus_low_temp_bound"] = bootstrap_ci(np.subtract(power["bound_terms"], low["bound_terms"]))
    summary["power_minus_low_temp_log_p"] = bootstrap_ci(np.subtract(power["log_p"], low["log_p"]))
    diff = summary["power_minus_low_temp_bound"]
    print(f"fidelity power - low-temp bound: {diff['mean']:.2f} [{diff['ci_low']:.2f}, {diff['ci_high']:.2f}] "
          f"(paired, {diff['n']} prompts)")
    return {"alpha": config.alpha, "max_new_tokens": max_new_tokens, "prompts": len(prompts),
            "config": vars_config(config), "methods": summary}


# -- tasks -----------------------------------------------------------------------------------------------------------

def task_methods(config, max_new_tokens, power_tokens, max_mcmc_steps):
    """Every method of the task comparison, with options matched to power's sampled tokens on this item.

    Best-of-N and self-consistency draw ``power_tokens / max_new_tokens`` samples. An MH step of
    MCMC redraws about half the text, so it gets ``2 * (power_tokens - max_new_tokens) / max_new_tokens``
    steps, capped at ``max_mcmc_steps`` because each step is a sequential batch-1 decode.
    """
    n = max(1, round(power_tokens / max_new_tokens))
    mcmc_steps = min(max_mcmc_steps, max(1, round(2 * (power_tokens - max_new_tokens) / max_new_tokens)))
    return {
        "greedy": ("greedy", {}),
        "low-temp": ("low-temp", {"alpha": config.alpha}),
        "best-of-n": ("best-of-n", {"n": n}),
        "self-consistency": ("self-consistency", {"n": n}),
        "mcmc": ("mcmc", {"alpha": config.alpha, "mcmc_steps": mcmc_steps, "block_size": max_new_tokens}),
    }


def bench_tasks(model, tokenizer, config, items, max_new_tokens, mcmc_steps):
    names = ["greedy", "low-temp", "best-of-n", "self-consistency", "mcmc", "power"]
    correct = {name: [] for name in names}
    tokens = {name: [] for name in names}
    seconds = {name: [] for name in names}

    def record(name, item, result):
        correct[name].append(float(is_correct(item, result.text)))
        tokens[name].append(result.budget.rollout_steps)
        seconds[name].append(result.budget.seconds)

    for i, item in enumerate(items):
        power = decode("power", model, tokenizer, chat(item.prompt), max_new_tokens,
                       torch.Generator().manual_seed(2000 + i), config=config)
        record("power", item, power)
        methods = task_methods(config, max_new_tokens, power.budget.rollout_steps, mcmc_steps)
        for name, (method, options) in methods.items():
            if method == "self-consistency":
                options = dict(options, answer_fn=lambda text, task=item.task: extract_answer(task, text))
            generator = torch.Generator().manual_seed(2000 + i)
            result = decode(method, model, tokenizer, chat(item.prompt), max_new_tokens, generator, **options)
            record(name, item, result)
        print(f"  task item {i + 1}/{len(items)}", file=sys.stderr)

    summary = {}
    for name in names:
        summary[name] = {"accuracy": bootstrap_ci(correct[name]), "mean_sampled_tokens": float(np.mean(tokens[name])),
                         "mean_seconds": float(np.mean(seconds[name])),
                         "by_task": {task: float(np.mean([c for c, it in zip(correct[name], items) if it.task == task]))
                                     for task in sorted({it.task for it in items})}}
        if name != "power":
            summary[name]["power_minus_this"] = bootstrap_ci(np.subtract(correct["power"], correct[name]))
        acc = summary[name]["accuracy"]
        print(f"tasks {name:17s} accuracy {acc['mean']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]  "
              f"tokens/item {summary[name]['mean_sampled_tokens']:7.0f}  s/item {summary[name]['mean_seconds']:.1f}")
    return {"items": len(items), "max_new_tokens": max_new_tokens, "config": vars_config(config),
            "max_mcmc_steps": mcmc_steps, "methods": summary}


# -- MCMC -----------------------------------------------------------------------------------------------------------

def bench_mcmc(model, tokenizer, config, prompts, max_new_tokens, mcmc_steps_grid):
    def run(method, options):
        log_p, seconds = [], []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(3000 + i)
            result = decode(method, model, tokenizer, chat(prompt), max_new_tokens, generator, **options)
            log_p.append(result.log_p)
            seconds.append(result.budget.seconds)
        return {"log_p": bootstrap_ci(log_p), "total_seconds": float(np.sum(seconds))}

    power = run("power", {"config": config})
    print(f"mcmc: power mean log p {power['log_p']['mean']:.2f} in {power['total_seconds']:.1f} s")
    chain = {}
    for steps in mcmc_steps_grid:
        chain[steps] = run("mcmc", {"alpha": config.alpha, "mcmc_steps": steps, "block_size": max_new_tokens})
        print(f"mcmc: {steps:3d} MH steps mean log p {chain[steps]['log_p']['mean']:.2f} "
              f"in {chain[steps]['total_seconds']:.1f} s")
    reached = [s for s in mcmc_steps_grid if chain[s]["log_p"]["mean"] >= power["log_p"]["mean"]]
    result = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "power": power,
              "mcmc": {str(s): v for s, v in chain.items()}}
    if reached:
        first = reached[0]
        result["mcmc_steps_to_match"] = first
        result["wall_time_ratio_mcmc_over_power"] = chain[first]["total_seconds"] / power["total_seconds"]
        print(f"mcmc: {first} MH steps match power's mean log p; wall time ratio mcmc/power "
              f"{result['wall_time_ratio_mcmc_over_power']:.2f}")
    else:
        result["mcmc_steps_to_match"] = None
        print(f"mcmc: no chain length in {list(mcmc_steps_grid)} reached power's mean log p")
    return result


def vars_config(config):
    return {k: (v if not (isinstance(v, float) and math.isinf(v)) else "inf") for k, v in vars(config).items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="speed,fidelity,tasks,mcmc", help="comma-separated sections to run")
    parser.add_argument("--quick", action="store_true", help="small sizes that fit a few CPU minutes per section")
    parser.add_argument("--out", default="bench-results/lm.json", help="JSON file for every figure")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"speed", "fidelity", "tasks", "mcmc"}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from speed, fidelity, tasks, mcmc")

    model, tokenizer = load_model(args.model)
    torch.manual_seed(0)
    quick = args.quick
    speed_config = PowerSamplingConfig.from_preset("minimal", rollout_proposal="tempered")
    config = PowerSamplingConfig(num_candidates=4, num_rollouts=2 if quick else 4, rollout_length=6 if quick else 12,
                                 alpha=4.0, rollout_proposal="tempered", estimator="jackknife")
    report = {"quick": quick, "threads": torch.get_num_threads(), "model": args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)",
              "torch": torch.__version__}

    if "speed" in sections:
        report["speed"] = {proposal: bench_speed(model, tokenizer, speed_config.replace(rollout_proposal=proposal),
                                                 repeats=3 if quick else 10)
                           for proposal in ("tempered", "base")}
    if "fidelity" in sections:
        prompts = fidelity_prompts(12 if quick else 50)
        report["fidelity"] = bench_fidelity(model, tokenizer, config, prompts, max_new_tokens=8 if quick else 24)
    if "tasks" in sections:
        items = make_items(per_task=30, seed=0)
        if quick:
            # make_items lists the tasks in blocks of 30 items, so this keeps the first 4 of each task.
            items = [item for i, item in enumerate(items) if i % 30 < 4]
        report["tasks"] = bench_tasks(model, tokenizer, config, items, max_new_tokens=10 if quick else 16,
                                      mcmc_steps=16 if quick else 64)
    if "mcmc" in sections:
        prompts = fidelity_prompts(6 if quick else 20)
        report["mcmc"] = bench_mcmc(model, tokenizer, config, prompts, max_new_tokens=8 if quick else 24,
                                    mcmc_steps_grid=(2, 8, 32) if quick else (4, 16, 64, 256))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
