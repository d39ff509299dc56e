"""Image benchmark: power sampling against best-of-N, SVDD-PM and FK steering at matched UNet rows.

Every method gets the same compute budget: a multiple of the base sampler's UNet
rows per image, where a latent under classifier-free guidance counts twice. Each
method's settings (N, K, particles, guided steps) are planned to spend at most that
budget. Images are judged by the guiding CLIP reward, by the test bed's independent
digit classifier, and by diversity across seeds. Every mean carries a paired
bootstrap confidence interval over (prompt, seed) units.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

METHODS = ("best-of-n", "svdd", "fk", "power-1step", "power-rollout")
DEFAULT_BUDGETS = (1, 2, 4, 8, 16)
QUICK_BUDGETS = (1, 2, 4)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class BenchSettings:
    """Prompts, seeds, budgets and method settings of one benchmark run.

    Attributes:
        prompts: prompts, one image per prompt and seed.
        seeds: seeds; image (prompt p, seed s) starts from the same noise for every method.
        budgets: compute budgets as multiples of the base sampler's UNet rows per image.
        methods: methods to run besides the base sampler, from ``METHODS``.
        steps: denoising steps of the main chain.
        guidance_scale: classifier-free guidance scale.
        eta: DDIM stochasticity of the main chain (1 is ancestral).
        svdd_lam: SVDD temperature on raw rewards; 0 keeps the best candidate.
        fk_lam: FK potential inverse temperature on raw rewards.
        fk_potential: FK potential (``"difference"``, ``"max"`` or ``"sum"``).
        fk_interval: steps between FK resamplings.
        fk_ess_threshold: FK resamples only below this ESS fraction; ``None`` always resamples.
        power_lam: power-sampling temperature on rewards standardised over each candidate set.
        power_selection: ``"sample"`` or ``"argmax"`` over the reweighted candidates.
        power_rollout_steps: rollout steps of ``power-rollout`` (``power-1step`` uses 1).
        power_window: guided steps when a budget cannot guide them all with 2 candidates:
            ``"early"`` takes the first steps that fit, ``"spread"`` spaces them over the schedule.
        max_batch_size: largest number of rows in one UNet call.
        bootstrap_samples: bootstrap resamples per confidence interval.
        bootstrap_seed: seed of the bootstrap's generator.
    """

    prompts: tuple
    seeds: tuple = (0, 1, 2)
    budgets: tuple = DEFAULT_BUDGETS
    methods: tuple = METHODS
    steps: int = 20
    guidance_scale: float = 1.0
    eta: float = 1.0
    svdd_lam: float = 0.0
    fk_lam: float = 1.0
    fk_potential: str = "max"
    fk_interval: int = 4
    fk_ess_threshold: Optional[float] = None
    power_lam: float = 0.5
    power_selection: str = "sample"
    power_rollout_steps: int = 4
    power_window: str = "early"
    max_batch_size: int = 1024
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if not self.prompts:
            raise ValueError("the benchmark needs at least one prompt")
        if not self.seeds:
            raise ValueError("the benchmark needs at least one seed")
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets are multiples of the base sampler's cost and must be >= 1, got {self.budgets}")
        if self.power_window not in ("early", "spread"):
            raise ValueError(f"power_window must be 'early' or 'spread', got {self.power_window!r}")

    @property
    def rows_per_step(self) -> int:
        """UNet rows of one latent at one step: 2 under classifier-free guidance."""
        return 2 if self.guidance_scale > 1 else 1

    @property
    def base_rows(self) -> int:
        """UNet rows per image of the base sampler."""
        return self.rows_per_step * self.steps


@dataclass(frozen=True)
class MethodPlan:
    """Settings of one method at one budget, and the UNet rows per image they spend."""

    method: str
    multiple: float
    settings: dict
    planned_rows: int


# --- Planning: settings that spend at most the budget ---------------------------------------------------


def plan_method(method: str, multiple: float, settings: BenchSettings) -> Optional[MethodPlan]:
    """Settings of ``method`` that fit ``multiple`` times the base rows, or None when none fit."""
    budget_rows = int(math.floor(multiple * settings.base_rows))
    if method == "best-of-n":
        n = int(math.floor(multiple))
        return MethodPlan(method, multiple, {"n": n}, n * settings.base_rows) if n >= 2 else None
    if method == "fk":
        k = int(math.floor(multiple))
        return MethodPlan(method, multiple, {"num_particles": k}, k * settings.base_rows) if k >= 2 else None
    if method == "svdd":
        return _plan_svdd(multiple, budget_rows, settings)
    if method in ("power-1step", "power-rollout"):
        rollout_steps = 1 if method == "power-1step" else settings.power_rollout_steps
        return _plan_power(method, multiple, budget_rows, rollout_steps, settings)
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def svdd_rows(num_candidates: int, num_guided: int, settings: BenchSettings) -> int:
    """UNet rows per image of SVDD: x_T once, K rows per guided step, 1 row per other step but the last."""
    other = settings.steps - 1 - num_guided
    return settings.rows_per_step * (1 + num_candidates * num_guided + other)


def _plan_svdd(multiple, budget_rows, settings) -> Optional[MethodPlan]:
    num_steps = settings.steps
    all_steps = list(range(num_steps - 1))
    k = (budget_rows // settings.rows_per_step - 1) // (num_steps - 1)
    if k >= 2:
        guided = all_steps
    else:
        k = 2
        fit = (budget_rows // settings.rows_per_step - num_steps) // (k - 1)
        if fit < 1:
            return None
        guided = _choose_steps(all_steps, min(fit, len(all_steps)), settings.power_window)
    plan = {"num_candidates": k, "guided_steps": guided}
    return MethodPlan("svdd", multiple, plan, svdd_rows(k, len(guided), settings))


def power_step_cost(step: int, rollout_steps: int, settings: BenchSettings) -> int:
    """UNet rows of rolling one candidate out from guided step ``step``, as the pipeline's rollout plan runs it."""
    remaining = settings.steps - (step + 1)
    return settings.rows_per_step * min(rollout_steps, remaining)


def power_rows(k: int, guided: list, rollout_steps: int, settings: BenchSettings) -> int:
    """UNet rows of one power-sampled image with K candidates at the ``guided`` steps."""
    rows = settings.base_rows + k * sum(power_step_cost(i, rollout_steps, settings) for i in guided)
    if rollout_steps == 1:
        # The kept candidate's one-step rollout output is reused as the next main step's noise prediction.
        rows -= settings.rows_per_step * len(guided)
    return rows


def _plan_power(method, multiple, budget_rows, rollout_steps, settings) -> Optional[MethodPlan]:
    all_steps = list(range(settings.steps - 1))
    per_candidate = sum(power_step_cost(i, rollout_steps, settings) for i in all_steps)
    k = (budget_rows - power_rows(0, all_steps, rollout_steps, settings)) // per_candidate
    guided = all_steps
    if k < 2:
        k = 2
        guided = _fit_steps(all_steps, budget_rows, k, rollout_steps, settings)
        if not guided:
            return None
    plan = {"num_candidates": k, "guided_steps": guided, "rollout_steps": rollout_steps}
    return MethodPlan(method, multiple, plan, power_rows(k, guided, rollout_steps, settings))


def _fit_steps(all_steps, budget_rows, k, rollout_steps, settings) -> list:
    """Largest set of guided steps in the configured window whose K candidates' rollouts fit ``budget_rows``."""
    for count in range(len(all_steps), 0, -1):
        steps = _choose_steps(all_steps, count, settings.power_window)
        if power_rows(k, steps, rollout_steps, settings) <= budget_rows:
            return steps
    return []


def _choose_steps(all_steps: list, count: int, window: str) -> list:
    if window == "early":
        return all_steps[:count]
    positions = np.linspace(0, len(all_steps) - 1, count).round().astype(int)
    return sorted({all_steps[p] for p in positions})


# --- Running -----------------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """The loaded test bed: pipeline, guiding scorer and the judge module."""

    pipe: object
    scorer: object
    judge: object
    device: torch.device

    @classmethod
    def load(cls, device: str = "cpu") -> "BenchContext":
        """Load the bundled digits test bed: its SD pipeline, its CLIP reward and its digit judge."""
        from psdiffusion import testbed
        from psdiffusion.pipelines import PowerSamplingStableDiffusionPipeline
        from psdiffusion.scorers import CLIPScorer

        pipe = PowerSamplingStableDiffusionPipeline.from_pretrained(
            str(testbed.sd_model_dir()), safety_checker=None, requires_safety_checker=False, local_files_only=True)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        scorer = CLIPScorer("local-dir:" + str(testbed.clip_model_dir())).to(device)
        return cls(pipe, scorer, testbed, torch.device(device))


def image_seed(seed: int, prompt_index: int) -> int:
    """Seed of the generator of image (prompt, seed); every method starts image (p, s) from the same noise."""
    return 1_000_003 * seed + prompt_index


def run_plan(context: BenchContext, plan: Optional[MethodPlan], settings: BenchSettings, seed: int):
    """Sample one image per prompt with ``plan`` (None is the base sampler); return images (B, 3, H, W) and the budget."""
    prompts = list(settings.prompts)
    generators = [torch.Generator(context.device).manual_seed(image_seed(seed, p)) for p in range(len(prompts))]
    common = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                  generator=generators, scorer=context.scorer, max_batch_size=settings.max_batch_size)
    if plan is None:
        return _run_base(context, prompts, common, settings)
    if plan.method == "best-of-n":
        return _run_best_of_n(context, prompts, plan.settings["n"], seed, settings)
    if plan.method == "svdd":
        from psdiffusion.pipelines.baselines import sample_svdd

        output = sample_svdd(context.pipe, prompts, eta=settings.eta, lam=settings.svdd_lam, **plan.settings,
                             **common)
        return output.images, output.budget
    if plan.method == "fk":
        from psdiffusion.pipelines.baselines import sample_fk_steering

        output = sample_fk_steering(context.pipe, prompts, eta=settings.eta, lam=settings.fk_lam,
                                    potential=settings.fk_potential, resample_interval=settings.fk_interval,
                                    ess_threshold=settings.fk_ess_threshold, **plan.settings, **common)
        return output.images, output.budget
    return _run_power(context, prompts, plan, common, settings)


def _run_base(context, prompts, common, settings):
    output = context.pipe(prompts, eta=settings.eta, output_type="pt", guided_steps=[], **common)
    return output.images, output.budget


def _run_power(context, prompts, plan, common, settings):
    from psdiffusion.core import PowerSamplingConfig

    config = PowerSamplingConfig(
        num_candidates=plan.settings["num_candidates"],
        num_rollouts=1,
        rollout_length=plan.settings["rollout_steps"],
        alpha=1.0,
        lam=settings.power_lam,
        estimator="plain",
        selection=settings.power_selection,
        standardize_rewards=True,
        max_batch_size=settings.max_batch_size,
    )
    common = {name: value for name, value in common.items() if name != "max_batch_size"}
    output = context.pipe(prompts, eta=settings.eta, output_type="pt", power_sampling_config=config,
                          guided_steps=plan.settings["guided_steps"], rollout_steps=plan.settings["rollout_steps"],
                          rollout_eta=1.0, **common)
    return output.images, output.budget


def _run_best_of_n(context, prompts, n, seed, settings):
    """N base samples per prompt in one batch; draw 0 is the base sampler's image, so the pair is exact."""
    B = len(prompts)
    repeated = [prompt for prompt in prompts for _ in range(n)]  # (B*N,), ordered (b, n)
    generators = [torch.Generator(context.device).manual_seed(image_seed(seed, p) + 7_919 * draw)
                  for p in range(B) for draw in range(n)]
    output = context.pipe(repeated, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                          eta=settings.eta, generator=generators, output_type="pt", guided_steps=[],
                          scorer=context.scorer, max_batch_size=settings.max_batch_size)
    budget = output.budget
    rewards = context.pipe.score_images(context.scorer, output.images, repeated, budget).view(B, n)
    best = rewards.argmax(dim=1)  # (B,)
    images = output.images.view(B, n, *output.images.shape[1:])[torch.arange(B), best]
    return images, budget


@dataclass
class RunRecord:
    """One (method, budget, seed) run over all prompts, with per-image metrics."""

    method: str
    multiple: float
    seed: int
    settings: dict
    rewards: list
    correct: list
    nfe_per_image: float
    seconds_per_image: float
    vae_decodes_per_image: float
    scored_images_per_image: float
    images: Optional[torch.Tensor] = field(default=None, repr=False)


def evaluate(context: BenchContext, images: torch.Tensor, prompts: list) -> tuple[list, list]:
    """Guiding CLIP reward and the judge's verdict (digit named by the prompt seen) per image."""
    with torch.no_grad():
        rewards = context.scorer(images.to(context.device), prompts).float().cpu()
    targets = torch.tensor([context.judge.digit_of_prompt(p) for p in prompts])
    judged = context.judge.judge_digits(images.to(context.device)).cpu()
    return rewards.tolist(), (judged == targets).tolist()


def run_benchmark(context: BenchContext, settings: BenchSettings, progress=None) -> list:
    """Run the base sampler once per seed (the 1x point of every method) and each method at each budget."""
    runs = [(None, 1)] + [(m, b) for b in settings.budgets if b > 1 for m in settings.methods]
    records = []
    for method, multiple in runs:
        plan = None if method is None else plan_method(method, multiple, settings)
        if method is not None and plan is None:
            logger.info("%s does not fit %gx the base rows; skipped", method, multiple)
            continue
        for seed in settings.seeds:
            start = time.perf_counter()
            images, budget = run_plan(context, plan, settings, seed)
            rewards, correct = evaluate(context, images, list(settings.prompts))
            B = len(settings.prompts)
            record = RunRecord(
                method="base" if plan is None else plan.method,
                multiple=multiple,
                seed=seed,
                settings={} if plan is None else plan.settings,
                rewards=rewards,
                correct=correct,
                nfe_per_image=budget.unet_rows / B,
                seconds_per_image=budget.seconds / B,
                vae_decodes_per_image=budget.vae_decodes / B,
                scored_images_per_image=budget.scored_images / B,
                images=images.cpu(),
            )
            if plan is not None and record.nfe_per_image > plan.planned_rows:
                raise RuntimeError(f"{plan.method} at {multiple}x spent {record.nfe_per_image} UNet rows per image, "
                                   f"more than the {plan.planned_rows} planned; the budget plan is wrong")
            records.append(record)
            if progress is not None:
                progress(record, time.perf_counter() - start)
    return records


# --- Statistics --------------------------------------------------------------------------------------------


def bootstrap_mean(values: np.ndarray, samples: int, rng: np.random.Generator) -> dict:
    """Mean of ``values`` (n,) over units and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    index = rng.integers(0, len(values), size=(samples, len(values)))
    means = values[index].mean(axis=1)
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def unit_values(records: list, method: str, multiple: float, metric: str) -> np.ndarray:
    """Metric per (seed, prompt) unit, seeds in order: (S*P,); the same unit order for every method."""
    chosen = sorted((r for r in records if r.method == method and r.multiple == multiple), key=lambda r: r.seed)
    return np.concatenate([np.asarray(getattr(r, metric), dtype=np.float64) for r in chosen])


def diversity(records: list, method: str, multiple: float) -> Optional[np.ndarray]:
    """Per prompt: mean pairwise RMS pixel distance between the images of different seeds; None with one seed."""
    chosen = sorted((r for r in records if r.method == method and r.multiple == multiple), key=lambda r: r.seed)
    if len(chosen) < 2:
        return None
    images = torch.stack([r.images for r in chosen], dim=1).flatten(2)  # (P, S, 3*H*W)
    distances = torch.cdist(images, images) / math.sqrt(images.shape[-1])  # (P, S, S)
    S = images.shape[1]
    return (distances.sum(dim=(1, 2)) / (S * (S - 1))).numpy()


def summarize(records: list, settings: BenchSettings) -> list:
    """Summarise the base sampler and each (method, budget): means with bootstrap intervals, paired differences."""
    rng = np.random.default_rng(settings.bootstrap_seed)
    samples = settings.bootstrap_samples
    keys = [("base", 1)] + [(m, b) for m in settings.methods for b in settings.budgets if _has(records, m, b)]
    rows = []
    for method, multiple in keys:
        reward = unit_values(records, method, multiple, "rewards")
        correct = unit_values(records, method, multiple, "correct")
        chosen = [r for r in records if r.method == method and r.multiple == multiple]
        row = {
            "method": method,
            "multiple": multiple,
            "settings": chosen[0].settings,
            "nfe": float(np.mean([r.nfe_per_image for r in chosen])),
            "seconds": float(np.mean([r.seconds_per_image for r in chosen])),
            "vae_decodes": float(np.mean([r.vae_decodes_per_image for r in chosen])),
            "reward": bootstrap_mean(reward, samples, rng),
            "accuracy": bootstrap_mean(correct, samples, rng),
            "units": int(len(reward)),
        }
        spread = diversity(records, method, multiple)
        row["diversity"] = None if spread is None else bootstrap_mean(spread, samples, rng)
        if method not in ("base", "best-of-n") and _has(records, "best-of-n", multiple):
            best_reward = unit_values(records, "best-of-n", multiple, "rewards")
            best_correct = unit_values(records, "best-of-n", multiple, "correct")
            row["reward_minus_best_of_n"] = bootstrap_mean(reward - best_reward, samples, rng)
            row["accuracy_minus_best_of_n"] = bootstrap_mean(correct - best_correct, samples, rng)
        rows.append(row)
    _add_overoptimisation_flags(rows, records, settings, rng)
    return rows


def _has(records, method, multiple) -> bool:
    return any(r.method == method and r.multiple == multiple for r in records)


def _add_overoptimisation_flags(rows: list, records: list, settings: BenchSettings, rng) -> None:
    """Flag a method whose reward rises over the base sampler while its judged accuracy falls.

    ``overoptimisation`` is "yes" when the paired intervals show reward up and accuracy down,
    "possible" when only the point estimates do, and "no" otherwise.
    """
    base_reward = unit_values(records, "base", 1, "rewards")
    base_correct = unit_values(records, "base", 1, "correct")
    for row in rows:
        if row["multiple"] == 1:
            row["overoptimisation"] = "no"
            continue
        reward = unit_values(records, row["method"], row["multiple"], "rewards")
        correct = unit_values(records, row["method"], row["multiple"], "correct")
        reward_gain = bootstrap_mean(reward - base_reward, settings.bootstrap_samples, rng)
        accuracy_gain = bootstrap_mean(correct - base_correct, settings.bootstrap_samples, rng)
        row["reward_minus_base"] = reward_gain
        row["accuracy_minus_base"] = accuracy_gain
        if reward_gain["low"] > 0 and accuracy_gain["high"] < 0:
            row["overoptimisation"] = "yes"
        elif reward_gain["mean"] > 0 and accuracy_gain["mean"] < 0:
            row["overoptimisation"] = "possible"
        else:
            row["overoptimisation"] = "no"


def half_budget_comparisons(records: list, settings: BenchSettings) -> list:
    """Power sampling at budget m/2 against best-of-N at budget m: paired reward difference per m."""
    rng = np.random.default_rng(settings.bootstrap_seed + 1)
    comparisons = []
    for method in ("power-1step", "power-rollout"):
        for multiple in settings.budgets:
            half = multiple / 2
            if not (_has(records, "best-of-n", multiple) and _has(records, method, half)):
                continue
            power = unit_values(records, method, half, "rewards")
            best = unit_values(records, "best-of-n", multiple, "rewards")
            comparisons.append({"method": method, "power_multiple": half, "best_of_n_multiple": multiple,
                                "reward_difference": bootstrap_mean(power - best, settings.bootstrap_samples, rng)})
    return comparisons


def settings_dict(settings: BenchSettings) -> dict:
    """Settings as plain JSON values."""
    values = asdict(settings)
    values["prompts"] = list(settings.prompts)
    return values


# --- Report --------------------------------------------------------------------------------------------------


def write_report(records: list, settings: BenchSettings, out_dir, command: str, total_seconds: float) -> dict:
    """Write results.json, table.md, the two NFE plots and one image grid per method into ``out_dir``."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, settings)
    half = half_budget_comparisons(records, settings)
    results = {
        "command": command,
        "total_seconds": round(total_seconds, 1),
        "settings": settings_dict(settings),
        "base_rows": settings.base_rows,
        "summary": rows,
        "power_at_half_budget_vs_best_of_n": half,
        "runs": [_run_json(r) for r in records],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "table.md").write_text(markdown_table(rows, half, settings, command, total_seconds))
    plot_metric(rows, "reward", "guiding CLIP reward", out_dir / "reward_vs_nfe.png", settings)
    plot_metric(rows, "accuracy", "judged accuracy", out_dir / "accuracy_vs_nfe.png", settings)
    write_grids(records, settings, out_dir / "grids")
    return results


def _run_json(record: RunRecord) -> dict:
    values = asdict(record)
    values.pop("images")
    return values


def _interval(stat: Optional[dict], digits: int = 2, percent: bool = False) -> str:
    if stat is None:
        return "n/a"
    scale = 100.0 if percent else 1.0
    return (f"{stat['mean'] * scale:.{digits}f} [{stat['low'] * scale:.{digits}f}, "
            f"{stat['high'] * scale:.{digits}f}]")


def _describe(row: dict) -> str:
    settings = row["settings"]
    if row["method"] == "base":
        return "base sampler"
    if row["method"] == "best-of-n":
        return f"N={settings['n']}"
    if row["method"] == "fk":
        return f"k={settings['num_particles']}"
    guided = len(settings["guided_steps"])
    text = f"K={settings['num_candidates']}, {guided} guided steps"
    if "rollout_steps" in settings:
        text += f", {settings['rollout_steps']}-step rollouts"
    return text


def markdown_table(rows: list, half: list, settings: BenchSettings, command: str, total_seconds: float) -> str:
    """The summary as Markdown: one row per method and budget, then the half-budget comparison."""
    lines = [
        f"Command: `{command}` ({total_seconds / 60:.1f} min on this machine's CPU).",
        "",
        f"{len(settings.prompts)} prompts x {len(settings.seeds)} seeds = {rows[0]['units']} paired units per row; "
        f"base sampler: DDIM eta={settings.eta}, {settings.steps} steps, guidance {settings.guidance_scale} "
        f"= {settings.base_rows} UNet rows per image. Brackets: {CONFIDENCE:.0%} paired bootstrap intervals "
        f"({settings.bootstrap_samples} resamples, seed {settings.bootstrap_seed}). Differences are paired "
        "over (prompt, seed) units.",
        "",
        "| method | budget | settings | NFE/image | reward | judged accuracy % | diversity | s/image "
        "| reward - best-of-N | accuracy - best-of-N (pp) | over-optimised |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['multiple']:g}x | {_describe(row)} | {row['nfe']:.0f} | "
            f"{_interval(row['reward'])} | {_interval(row['accuracy'], 1, True)} | "
            f"{_interval(row['diversity'], 3)} | {row['seconds']:.3f} | "
            f"{_interval(row.get('reward_minus_best_of_n'))} | "
            f"{_interval(row.get('accuracy_minus_best_of_n'), 1, True)} | {row['overoptimisation']} |"
        )
    if half:
        lines += ["", "Power sampling at half of best-of-N's budget (reward difference, power minus best-of-N):", "",
                  "| method | power budget | best-of-N budget | reward difference |", "|---|---|---|---|"]
        for item in half:
            lines.append(f"| {item['method']} | {item['power_multiple']:g}x | {item['best_of_n_multiple']:g}x | "
                         f"{_interval(item['reward_difference'])} |")
    lines += ["", "Over-optimised: 'yes' when the paired intervals against the base sampler show reward up and "
              "judged accuracy down; 'possible' when only the point estimates do."]
    return "\n".join(lines) + "\n"


def plot_metric(rows: list, metric: str, label: str, path, settings: BenchSettings) -> None:
    """Plot ``metric`` against NFE per image for every method, with bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    scale = 100.0 if metric == "accuracy" else 1.0
    for method in settings.methods:
        # Every line starts at the base sampler's point (1x), which all methods share.
        points = sorted((r for r in rows if r["method"] in (method, "base")), key=lambda r: r["nfe"])
        if not points:
            continue
        x = [p["nfe"] for p in points]
        y = [p[metric]["mean"] * scale for p in points]
        error = [[(p[metric]["mean"] - p[metric]["low"]) * scale for p in points],
                 [(p[metric]["high"] - p[metric]["mean"]) * scale for p in points]]
        axes.errorbar(x, y, yerr=error, marker="o", capsize=3, label=method)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("UNet rows (NFE) per image")
    axes.set_ylabel(label + (" (%)" if metric == "accuracy" else ""))
    axes.set_title(f"{label} against compute ({len(settings.prompts)} prompts x {len(settings.seeds)} seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_grids(records: list, settings: BenchSettings, grid_dir, max_prompts: int = 20) -> None:
    """One PNG per method at its largest budget (and the base sampler): first seed, up to ``max_prompts`` images."""
    from PIL import Image

    grid_dir.mkdir(parents=True, exist_ok=True)
    first_seed = settings.seeds[0]
    keys = [("base", 1)]
    for method in settings.methods:
        budgets = [r.multiple for r in records if r.method == method]
        if budgets:
            keys.append((method, max(budgets)))
    for method, multiple in keys:
        record = next(r for r in records if r.method == method and r.multiple == multiple and r.seed == first_seed)
        images = record.images[:max_prompts]  # (n, 3, H, W)
        columns = 10
        rows = math.ceil(images.shape[0] / columns)
        H, W = images.shape[-2:]
        canvas = torch.zeros(3, rows * (H + 2), columns * (W + 2))
        for index, image in enumerate(images):
            r, c = divmod(index, columns)
            canvas[:, r * (H + 2) + 1 : r * (H + 2) + 1 + H, c * (W + 2) + 1 : c * (W + 2) + 1 + W] = image
        array = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).resize((array.shape[1] * 2, array.shape[0] * 2), Image.NEAREST).save(
            grid_dir / f"{method}_{multiple:g}x.png")
