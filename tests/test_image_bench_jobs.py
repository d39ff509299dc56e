"""ImageJob, the runner behind ``psdiffusion image``, with every method on tiny seeded components."""

import pytest

from psdiffusion.image_jobs import ImageJob
from test_pipeline_sd import brightness_scorer, tiny_ddim_pipe

STEPS = 3
GUIDANCE = 2.0
BASE_ROWS = 2 * STEPS


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    pipe = tiny_ddim_pipe(tmp_path_factory.mktemp("tokenizer"))
    return ImageJob(pipe, brightness_scorer(), steps=STEPS, guidance_scale=GUIDANCE)


@pytest.mark.parametrize("method", ["base", "power", "best-of-n", "svdd", "fk"])
def test_job_methods_stay_within_budget(job, method):
    # The minimal preset runs 4 rollouts of 2 steps, so two power candidates need 7x here.
    budget = {"base": None, "power": 8.0}.get(method, 4.0)

    result = job.generate("a cat", seed=0, method=method, nfe_budget=budget)

    assert result.pixels.shape == (3, 32, 32)
    assert result.image.size == (32, 32)
    assert result.nfe <= (budget or 1.0) * BASE_ROWS
    assert result.nfe >= BASE_ROWS
    assert result.reward == pytest.approx(float(brightness_scorer()(result.pixels[None], ["a cat"])[0]))


def test_job_fk_uses_budget_as_particle_count(job):
    result = job.generate("a cat", seed=1, method="fk", nfe_budget=3.0)

    assert result.extra["num_particles"] == 3
    assert result.nfe == 3 * BASE_ROWS


def test_job_rejects_budget_too_small_for_svdd(job):
    with pytest.raises(SystemExit, match="too small for svdd"):
        job.generate("a cat", seed=0, method="svdd", nfe_budget=1.0)


def test_job_rejects_unknown_method(job):
    with pytest.raises(ValueError, match="method must be one of"):
        job.generate("a cat", seed=0, method="beam")


def test_job_power_budget_sets_candidates(job):
    result = job.generate("a cat", seed=0, method="power", nfe_budget=20.0)

    # Per candidate: 4 rollouts x 2 steps at step 0, 1 one-step rollout at step 1, 2 rows each: 18 rows.
    assert result.extra["num_candidates"] == (20 * BASE_ROWS - BASE_ROWS) // 18
    assert result.nfe <= 20 * BASE_ROWS


def test_job_power_rejects_budget_too_small(job):
    with pytest.raises(SystemExit, match="pass --nfe-budget 7 or more"):
        job.generate("a cat", seed=0, method="power", nfe_budget=4.0)
