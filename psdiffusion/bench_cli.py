"""``psdiffusion bench image``: power sampling against best-of-N, SVDD and FK steering on the digits test bed.

Writes ``results.json``, ``table.md``, ``reward_vs_nfe.png``, ``accuracy_vs_nfe.png``
and ``grids/`` into ``--out``. ``--quick`` is a small run (10 prompts, 2 seeds,
budgets 1x, 2x and 4x) for smoke tests.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

DEFAULT_PROMPTS_PER_DIGIT = 2
DEFAULT_SEEDS = 2
# Options of the image parser, kept to rebuild a run's command line for its report.
_IMAGE_PARSER_ACTIONS: list = []


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run benchmarks", description="Run a benchmark.")
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="{image}")
    parser = kinds.add_parser(
        "image",
        help="image benchmark on the bundled digits test bed",
        description="Compare power sampling with best-of-N, SVDD-PM and FK steering at matched UNet rows "
                    "(NFE) on the bundled digits test bed; writes a results JSON, a Markdown table, plots "
                    "and image grids.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small run: 1 prompt per digit, 2 seeds, budgets 1 2 4 (a few minutes on a CPU)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="NFE budgets as multiples of the base sampler's UNet rows (default: 1 2 4 8 16)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds, 0..N-1 (default: {DEFAULT_SEEDS}; 2 with --quick)")
    parser.add_argument("--prompts-per-digit", type=int, default=None,
                        help=f"prompts per digit taken from the fixed prompt set of 11 per digit "
                             f"(default: {DEFAULT_PROMPTS_PER_DIGIT}; 1 with --quick; 11 is all)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods besides the base sampler (default: best-of-n svdd fk power-1step power-rollout)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale of every method (default: the test bed's default, 1.0); "
                             "1 turns guidance off and halves the UNet rows per step")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps of the base sampler (default: the test bed's, 20)")
    parser.add_argument("--power-rollout-steps", type=int, default=4,
                        help="rollout denoising steps of power-rollout (default: 4)")
    parser.add_argument("--power-lam", type=float, default=0.5,
                        help="power-sampling temperature on standardised rewards (default: 0.5)")
    parser.add_argument("--power-selection", choices=("sample", "argmax"), default="sample",
                        help="power-sampling choice among reweighted candidates (default: sample)")
    parser.add_argument("--power-window", choices=("early", "spread"), default="early",
                        help="which steps to guide when a budget cannot guide all (default: early)")
    parser.add_argument("--svdd-lam", type=float, default=0.0,
                        help="SVDD temperature on raw rewards; 0 keeps the best candidate (default: 0)")
    parser.add_argument("--fk-lam", type=float, default=1.0,
                        help="FK steering inverse temperature on raw rewards (default: 1.0)")
    parser.add_argument("--fk-potential", choices=("difference", "max", "sum"), default="max",
                        help="FK steering potential (default: max)")
    parser.add_argument("--fk-interval", type=int, default=4, help="steps between FK resamplings (default: 4)")
    parser.add_argument("--fk-ess-threshold", type=float, default=None,
                        help="resample FK particles only when ESS < this fraction of k (default: always resample)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000,
                        help="bootstrap resamples per confidence interval (default: 2000)")
    parser.add_argument("--max-batch-size", type=int, default=1024,
                        help="largest number of rows in one UNet call (default: 1024)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is fastest on a CPU shared with "
                             "other jobs, where waiting threads spin")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/image"),
                        help="output folder (default: docs/benchmarks/image)")
    _IMAGE_PARSER_ACTIONS[:] = parser._actions


def select_prompts(prompts_per_digit: int) -> tuple:
    """Pick ``prompts_per_digit`` of each digit's prompts, alternating bare phrasings and attribute prompts."""
    from psdiffusion import testbed

    per_digit = len(testbed.PROMPTS) // 10
    if not 1 <= prompts_per_digit <= per_digit:
        raise SystemExit(f"error: --prompts-per-digit must be in [1, {per_digit}], got {prompts_per_digit}")
    # Positions 0-4 of a digit's block are the bare phrasings, 5-10 the attribute prompts;
    # stepping through the block alternately covers both.
    order = [0, 6, 2, 9, 4, 5, 1, 8, 3, 10, 7]
    positions = sorted(order[:prompts_per_digit])
    return tuple(testbed.PROMPTS[digit * per_digit + p] for digit in range(10) for p in positions)


def build_settings(args):
    from psdiffusion import testbed
    from psdiffusion.image_bench import DEFAULT_BUDGETS, METHODS, QUICK_BUDGETS, BenchSettings

    prompts_per_digit = args.prompts_per_digit or (1 if args.quick else DEFAULT_PROMPTS_PER_DIGIT)
    seeds = args.seeds or DEFAULT_SEEDS
    if args.budgets:
        budgets = tuple(args.budgets)
    else:
        budgets = QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS
    if seeds < 1:
        raise SystemExit(f"error: --seeds must be >= 1, got {seeds}")
    if any(b < 1 for b in budgets):
        raise SystemExit(f"error: --budgets are multiples of the base cost and must be >= 1, got {list(budgets)}")
    if 1 not in budgets:
        budgets = (1,) + budgets
    methods = tuple(args.methods) if args.methods else METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {' '.join(METHODS)}")
    steps = args.steps or testbed.DEFAULTS["num_inference_steps"]
    guidance_scale = testbed.DEFAULTS["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    if steps < 2:
        raise SystemExit(f"error: --steps must be >= 2, got {steps}")
    return BenchSettings(
        prompts=select_prompts(prompts_per_digit),
        steps=steps,
        guidance_scale=guidance_scale,
        seeds=tuple(range(seeds)),
        budgets=tuple(sorted(set(budgets))),
        methods=methods,
        svdd_lam=args.svdd_lam,
        fk_lam=args.fk_lam,
        fk_potential=args.fk_potential,
        fk_interval=args.fk_interval,
        fk_ess_threshold=args.fk_ess_threshold,
        power_lam=args.power_lam,
        power_selection=args.power_selection,
        power_rollout_steps=args.power_rollout_steps,
        power_window=args.power_window,
        max_batch_size=args.max_batch_size,
        bootstrap_samples=args.bootstrap_samples,
    )


def describe_command(args) -> str:
    """Rebuild the command line of this run from its parsed options, for the report."""
    words = ["psdiffusion", "bench", "image"]
    for action in _IMAGE_PARSER_ACTIONS:
        value = getattr(args, action.dest, action.default)
        if value == action.default or action.dest == "help":
            continue
        if value is True:
            words.append(action.option_strings[0])
        elif isinstance(value, (list, tuple)):
            words += [action.option_strings[0], *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [action.option_strings[0], str(value)]
    return " ".join(shlex.quote(word) for word in words)


def main(args) -> int:
    settings = build_settings(args)

    import torch

    from psdiffusion.image_bench import BenchContext, run_benchmark, write_report

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    command = describe_command(args)
    context = BenchContext.load(args.device)
    start = time.perf_counter()

    def progress(record, seconds):
        print(f"{record.method:>13} {record.multiple:>4g}x seed {record.seed}: "
              f"reward {sum(record.rewards) / len(record.rewards):.3f}, "
              f"accuracy {100 * sum(record.correct) / len(record.correct):.1f}%, "
              f"NFE {record.nfe_per_image:.0f}/image, {seconds:.1f}s", flush=True)

    records = run_benchmark(context, settings, progress)
    results = write_report(records, settings, args.out, command, time.perf_counter() - start)
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out}/results.json, table.md, reward_vs_nfe.png, accuracy_vs_nfe.png and grids/ "
          f"in {results['total_seconds'] / 60:.1f} min")
    return 0
