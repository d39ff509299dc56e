"""The image benchmark harness: budget plans, statistics and a run on tiny seeded components."""

import json
import types

import numpy as np
import pytest
import torch

from psdiffusion import image_bench
from psdiffusion.image_bench import (
    METHODS,
    BenchContext,
    BenchSettings,
    bootstrap_mean,
    plan_method,
    run_benchmark,
    svdd_rows,
    write_report,
)
from test_pipeline_sd import brightness_scorer, tiny_ddim_pipe

PROMPTS = ("a seven", "a one")


pytestmark = pytest.mark.usefixtures("single_thread")


def make_settings(**changes):
    return BenchSettings(prompts=("a handwritten digit seven",), guidance_scale=3.0, **changes)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("multiple", [1, 2, 3, 4, 8, 16])
def test_plans_stay_within_budget(method, multiple):
    settings = make_settings()
    plan = plan_method(method, multiple, settings)

    if plan is None:
        assert multiple < 2 or method == "power-rollout"
        return
    assert plan.planned_rows <= multiple * settings.base_rows
    assert plan.planned_rows > settings.base_rows


def test_plans_use_whole_budget_at_16x():
    settings = make_settings()

    assert plan_method("best-of-n", 16, settings).settings == {"n": 16}
    assert plan_method("fk", 16, settings).settings == {"num_particles": 16}
    assert plan_method("svdd", 16, settings).settings["num_candidates"] == 16
    assert svdd_rows(16, 19, settings) == 2 * (1 + 16 * 19)
    power = plan_method("power-1step", 16, settings)
    assert power.settings["num_candidates"] == 16
    assert power.planned_rows == svdd_rows(16, 19, settings)


def test_power_plan_guides_early_steps_when_short():
    plan = plan_method("power-rollout", 2, make_settings())

    assert plan.settings["num_candidates"] == 2
    assert plan.settings["guided_steps"] == [0, 1]


def test_spread_window_spaces_guided_steps():
    plan = plan_method("power-rollout", 4, make_settings(power_window="spread"))

    steps = plan.settings["guided_steps"]
    assert steps[0] == 0
    assert steps[-1] == 18
    assert len(steps) == 8


def test_settings_reject_unknown_method():
    with pytest.raises(ValueError, match="unknown methods"):
        make_settings(methods=("beam",))


def test_bootstrap_interval_brackets_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=400)

    stat = bootstrap_mean(values, 1000, np.random.default_rng(1))

    assert stat["low"] < stat["mean"] < stat["high"]
    assert stat["high"] - stat["low"] < 0.3
    assert bootstrap_mean(np.zeros(50), 100, rng) == {"mean": 0.0, "low": 0.0, "high": 0.0}


def fake_judge():
    """Judge whose verdict is 'seven' for bright images and 'one' for dark ones."""

    def digit_of_prompt(prompt):
        return 7 if "seven" in prompt else 1

    def judge_digits(images):
        return torch.where(images.mean(dim=(1, 2, 3)) > 0.5, torch.tensor(7), torch.tensor(1))

    return types.SimpleNamespace(digit_of_prompt=digit_of_prompt, judge_digits=judge_digits)


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    pipe = tiny_ddim_pipe(tmp_path_factory.mktemp("tokenizer"))
    return BenchContext(pipe, brightness_scorer(), fake_judge(), torch.device("cpu"))


def test_benchmark_on_tiny_components_writes_report(tiny_context, tmp_path):
    settings = BenchSettings(prompts=PROMPTS[:1], seeds=(0, 1), budgets=(1, 4), steps=3, guidance_scale=2.0,
                             power_rollout_steps=2, fk_interval=1, bootstrap_samples=200)

    records = run_benchmark(tiny_context, settings)
    results = write_report(records, settings, tmp_path, "psdiffusion bench image --test", 1.0)

    for record in records:
        if record.method == "base":
            assert record.nfe_per_image == settings.base_rows
        else:
            assert record.nfe_per_image == plan_method(record.method, record.multiple, settings).planned_rows
    methods_at_4x = {row["method"] for row in results["summary"] if row["multiple"] == 4}
    assert methods_at_4x == set(METHODS)
    assert [row["method"] for row in results["summary"] if row["multiple"] == 1] == ["base"]
    assert all(row["units"] == 2 for row in results["summary"])
    assert all(row["diversity"] is not None for row in results["summary"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == len(records)
    table = (tmp_path / "table.md").read_text()
    assert "| power-1step | 4x |" in table
    assert (tmp_path / "reward_vs_nfe.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_nfe.png").stat().st_size > 0
    assert (tmp_path / "grids" / "svdd_4x.png").is_file()


def test_best_of_n_keeps_first_draw_of_base(tiny_context):
    settings = BenchSettings(prompts=PROMPTS, seeds=(0,), budgets=(1, 2), steps=3, guidance_scale=2.0)
    base_images, _ = image_bench.run_plan(tiny_context, None, settings, 0)
    plan = plan_method("best-of-n", 2, settings)

    images, budget = image_bench.run_plan(tiny_context, plan, settings, 0)

    rewards = brightness_scorer()(images, list(PROMPTS))
    base_rewards = brightness_scorer()(base_images, list(PROMPTS))
    assert torch.all(rewards >= base_rewards - 1e-6)
    assert budget.unet_rows == 2 * 2 * settings.base_rows
