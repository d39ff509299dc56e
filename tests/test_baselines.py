"""SVDD-PM and FK steering samplers on tiny seeded components (32x32 images, offline)."""

import pytest
import torch
from diffusers import DDPMScheduler

from psdiffusion.pipelines.baselines import _ParticleState, fk_resampling_steps, sample_fk_steering, sample_svdd
from psdiffusion.scorers import CallableScorer
from test_pipeline_sd import brightness_scorer, favour_index, tiny_ddim_pipe

STEPS = 4
GUIDANCE = 2.0


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = tiny_ddim_pipe(tmp_path_factory.mktemp("tokenizer"))
    return pipe


def base_images(pipe, prompts, seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0, generator=generators,
                output_type="pt", guided_steps=[], scorer=brightness_scorer()).images


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def constant_scorer():
    return CallableScorer(lambda images, prompts: torch.zeros(images.shape[0]), name="constant")


def test_svdd_with_one_candidate_equals_base_sampler(pipe):
    expected = base_images(pipe, ["a cat"], [1])

    output = sample_svdd(pipe, ["a cat"], scorer=brightness_scorer(), num_candidates=1,
                         num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators([1]))

    assert output.images.shape == expected.shape
    assert (output.images - expected).abs().max() < 1e-4
    assert output.trace == []


@pytest.mark.parametrize("favoured", [0, 2])
def test_svdd_argmax_keeps_best_candidate(pipe, favoured):
    output = sample_svdd(pipe, "a cat", scorer=favour_index(favoured), num_candidates=3,
                         num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators([0]))

    assert [d.index for d in output.trace] == [0, 1, 2]
    assert all(d.chosen.tolist() == [favoured] for d in output.trace)
    assert output.trace[0].rewards.shape == (1, 3, 1)


def test_svdd_budget_reuses_kept_candidate_output(pipe):
    K, B = 3, 2
    output = sample_svdd(pipe, ["a cat"] * B, scorer=brightness_scorer(), num_candidates=K, guided_steps=[0, 2],
                         num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators([0, 1]))

    # Per image and guidance branch: x_T once, K rows at each of the 2 guided steps, 1 row at unguided step 1.
    assert output.budget.unet_rows == B * 2 * (1 + K * 2 + 1)
    assert output.budget.scored_images == B * K * 2
    assert output.budget.vae_decodes == B * K * 2 + B
    assert output.budget.decisions == 2


def test_svdd_soft_selection_is_reproducible(pipe):
    first = sample_svdd(pipe, "a cat", scorer=brightness_scorer(), num_candidates=3, lam=0.05,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators([7]))
    second = sample_svdd(pipe, "a cat", scorer=brightness_scorer(), num_candidates=3, lam=0.05,
                         num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators([7]))

    assert torch.equal(first.images, second.images)
    assert [d.chosen.tolist() for d in first.trace] == [d.chosen.tolist() for d in second.trace]
    assert torch.allclose(first.trace[0].log_pi.exp().sum(-1), torch.ones(1))


def test_fk_with_one_particle_equals_base_sampler(pipe):
    expected = base_images(pipe, ["a cat"], [3])

    output = sample_fk_steering(pipe, ["a cat"], scorer=brightness_scorer(), num_particles=1,
                                num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators([3]))

    assert (output.images - expected).abs().max() < 1e-4
    assert output.budget.unet_rows == 2 * STEPS


def test_fk_budget_is_particles_times_base(pipe):
    k, B = 3, 2
    output = sample_fk_steering(pipe, ["a cat"] * B, scorer=brightness_scorer(), num_particles=k,
                                resample_interval=2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                generator=generators([0, 1]))

    assert fk_resampling_steps(STEPS, 2) == [0, 2]
    assert output.budget.unet_rows == B * k * 2 * STEPS
    # Two potential evaluations and the final choice, each scoring every particle.
    assert output.budget.scored_images == B * k * 3
    assert output.images.shape == (B, 3, 32, 32)
    assert [record.index for record in output.trace] == [0, 2, STEPS]


def test_fk_resampling_copies_rewarded_particle(pipe):
    output = sample_fk_steering(pipe, "a cat", scorer=favour_index(1), num_particles=3, lam=50.0,
                                potential="difference", resample_interval=1, num_inference_steps=STEPS,
                                guidance_scale=GUIDANCE, generator=generators([0]))

    first = output.trace[0]
    assert first.resampled.tolist() == [True]
    assert first.ancestors.tolist() == [[1, 1, 1]]
    assert first.ess.item() == pytest.approx(1.0, abs=1e-3)


def test_fk_ess_threshold_skips_resampling_of_equal_weights(pipe):
    output = sample_fk_steering(pipe, "a cat", scorer=constant_scorer(), num_particles=3, ess_threshold=0.5,
                                resample_interval=1, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                generator=generators([0]))

    records = output.trace[:-1]
    assert len(records) == STEPS - 1
    assert not any(record.resampled.item() for record in records)
    assert all(record.ancestors.tolist() == [[0, 1, 2]] for record in records)


@pytest.mark.parametrize(
    "potential, expected",
    [
        # Rewards of one particle over three evaluations: 1, 3, 2; lam = 2.
        ("difference", [2.0, 4.0, -2.0]),
        ("max", [2.0, 6.0, 6.0]),
        ("sum", [2.0, 8.0, 12.0]),
    ],
)
def test_fk_potential_increments(potential, expected):
    state = _ParticleState.empty(1, 1, torch.device("cpu"))
    increments = []
    for reward in (1.0, 3.0, 2.0):
        before = state.log_weights.clone()
        state.add_potential(torch.tensor([[reward]]), 2.0, potential)
        increments.append((state.log_weights - before).item())

    assert increments == pytest.approx(expected)


@pytest.mark.slow
def test_fk_steering_raises_reward_over_base(pipe):
    seeds = list(range(6))
    base = brightness_scorer()(base_images(pipe, ["a cat"] * 6, seeds), ["a cat"] * 6)

    output = sample_fk_steering(pipe, ["a cat"] * 6, scorer=brightness_scorer(), num_particles=4, lam=200.0,
                                potential="max", resample_interval=1, num_inference_steps=STEPS,
                                guidance_scale=GUIDANCE, generator=generators(seeds))
    steered = brightness_scorer()(output.images, ["a cat"] * 6)

    assert steered.mean() > base.mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eta": 0.0}, "eta > 0"),
        ({"num_particles": 0}, "num_particles must be >= 1"),
        ({"potential": "mean"}, "potential must be one of"),
        ({"ess_threshold": 1.5}, "ess_threshold must be None"),
        ({"lam": 0.0}, "lam must be a finite number > 0"),
        ({"final_selection": "best"}, "final_selection must be one of"),
        ({"resample_interval": 0}, "resample_interval must be >= 1"),
    ],
)
def test_fk_rejects_invalid_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_fk_steering(pipe, "a cat", scorer=brightness_scorer(), num_inference_steps=STEPS,
                           guidance_scale=GUIDANCE, **kwargs)


def test_svdd_rejects_invalid_arguments(pipe):
    with pytest.raises(ValueError, match="lam must be >= 0"):
        sample_svdd(pipe, "a cat", scorer=brightness_scorer(), lam=-1.0, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"guided_steps must be step indices in \[0, 2\]"):
        sample_svdd(pipe, "a cat", scorer=brightness_scorer(), guided_steps=[3], num_inference_steps=STEPS)


def test_baselines_reject_non_ddim_scheduler(pipe):
    ddim = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(ddim.config)
    try:
        with pytest.raises(ValueError, match="step DDIM"):
            sample_svdd(pipe, "a cat", scorer=brightness_scorer(), num_inference_steps=STEPS)
    finally:
        pipe.scheduler = ddim
