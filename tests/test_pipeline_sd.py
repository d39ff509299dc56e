"""PowerSamplingStableDiffusionPipeline on tiny seeded components (32x32 images, offline)."""

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from psdiffusion.core import PowerSamplingConfig
from psdiffusion.pipelines import PowerSamplingStableDiffusionPipeline
from psdiffusion.pipelines.power_sampling_utils import resolve_guided_steps
from psdiffusion.scorers import CallableScorer

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_power_sampling_sd.py"


def write_tiny_tokenizer(folder):
    """Write a character-level CLIP BPE vocabulary (no merges beyond a few) and load it."""
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_ddim_pipe(tokenizer_folder):
    """A tiny power-sampling pipeline with an SD-style DDIM scheduler and no progress bar."""
    pipe = PowerSamplingStableDiffusionPipeline(**tiny_sd_components(tokenizer_folder), requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_components(tokenizer_folder, scheduler=None):
    """Seeded SD components: 2-block UNet (32, 64), 2-layer CLIP text encoder of width 32, 32x32 images."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
        attention_head_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=54, eos_token_id=55, pad_token_id=55, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16,
    ))
    scheduler = scheduler or DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           clip_sample=False, steps_offset=1)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": write_tiny_tokenizer(tokenizer_folder),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def top_left_brightness(images, prompts):
    """Reward that depends only on image content: mean brightness of the top-left quarter."""
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    return images[:, :, :h, :w].mean(dim=(1, 2, 3))


def brightness_scorer():
    return CallableScorer(top_left_brightness)


def favour_index(index):
    """Reward 1 for the image at position ``index`` of each scorer call and 0 elsewhere."""

    def reward(images, prompts):
        rewards = torch.zeros(images.shape[0])
        rewards[index] = 1.0
        return rewards

    return CallableScorer(reward, name=f"favour_{index}")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def pipe(components):
    pipe = PowerSamplingStableDiffusionPipeline(**components, scorer=brightness_scorer(),
                                                requires_safety_checker=False)
    pipe.scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    options = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np", num_candidates=2,
                   num_rollouts=2, rollout_steps=2)
    options.update(kwargs)
    return pipe("a cat", generator=torch.Generator().manual_seed(seed), **options)


def test_output_shapes_trace_and_budget(pipe):
    output = generate(pipe, num_images_per_prompt=2, num_candidates=3)

    assert output.images.shape == (2, 32, 32, 3)
    assert output.nsfw_content_detected is None
    assert [decision.index for decision in output.trace] == [0, 1]
    first = output.trace[0]
    assert first.rewards.shape == (2, 3, 2)
    assert first.log_w.shape == (2, 3, 2)
    assert first.log_pi.shape == (2, 3)
    assert first.ess.shape == (2,)
    assert torch.all((first.ess >= 1.0 - 1e-5) & (first.ess <= 3.0 + 1e-5))
    assert first.chosen.shape == (2,)
    assert first.extra["rollouts_deterministic"] is False
    budget = output.budget
    assert budget.decisions == 2
    # 2 images x 3 candidates x 2 rollouts at step 0 (2 rollout steps) and step 1 (1 remaining step, so M = 1).
    assert budget.scored_images == 12 + 6
    assert budget.vae_decodes == 12 + 6 + 2
    assert budget.unet_rows == 2 * (3 * 2 + 12 * 2 + 6)
    assert 0 < budget.forward_seconds <= budget.seconds


def test_same_generator_gives_same_image(pipe):
    first = generate(pipe, seed=3)
    second = generate(pipe, seed=3)
    other = generate(pipe, seed=4)

    assert (first.images == second.images).all()
    assert [d.chosen.tolist() for d in first.trace] == [d.chosen.tolist() for d in second.trace]
    assert not (first.images == other.images).all()


def test_micro_batch_size_does_not_change_image(pipe):
    large = generate(pipe, seed=5, max_batch_size=64)
    small = generate(pipe, seed=5, max_batch_size=2)

    assert small.budget.unet_calls > large.budget.unet_calls
    assert torch.allclose(torch.from_numpy(small.images), torch.from_numpy(large.images), atol=1e-4)


def test_one_candidate_reproduces_base_pipeline(pipe, components):
    base = StableDiffusionPipeline(**components, requires_safety_checker=False)
    base.scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    base.set_progress_bar_config(disable=True)
    expected = base("a cat", num_inference_steps=3, guidance_scale=2.0, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images

    output = generate(pipe, seed=1, num_candidates=1, num_rollouts=1, rollout_steps=1)

    assert len(output.trace) == 2
    assert all(d.chosen.tolist() == [0] for d in output.trace)
    assert abs(output.images - expected).max() < 1e-5


def test_one_rollout_runs_plain_estimator(pipe):
    output = generate(pipe, num_rollouts=1, rollout_steps=1)

    assert all(d.num_rollouts == 1 for d in output.trace)
    assert all(d.extra["rollouts_deterministic"] for d in output.trace)


def test_deterministic_rollouts_run_once_and_warn(pipe, caplog):
    with caplog.at_level("WARNING"):
        output = generate(pipe, num_rollouts=3, rollout_steps=1)

    assert all(d.rewards.shape[-1] == 1 for d in output.trace)
    assert "rollouts were deterministic at guided steps [0, 1]" in caplog.text
    assert "instead of 3" in caplog.text


def test_last_step_single_rollout_is_info_not_warning(pipe, caplog):
    # Step 0 rolls out over 2 stochastic steps; step 1 has one main step left, which no setting changes.
    with caplog.at_level("INFO", logger="psdiffusion.pipelines.power_sampling_utils"):
        output = generate(pipe, num_rollouts=2, rollout_steps=2)

    assert [d.num_rollouts for d in output.trace] == [2, 1]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "deterministic" in r.getMessage()]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "deterministic" in r.getMessage()]
    assert len(infos) == 1
    assert "guided steps [1]" in infos[0]


class BatchSizeRecorder:
    """Forward pre-hooks that record the batch size of every UNet and VAE-decoder call."""

    def __init__(self, pipe):
        self.unet, self.vae = [], []
        self.handles = [
            pipe.unet.register_forward_pre_hook(lambda module, args: self.unet.append(args[0].shape[0])),
            pipe.vae.decoder.register_forward_pre_hook(lambda module, args: self.vae.append(args[0].shape[0])),
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def size_recording_scorer(sizes):
    def reward(images, prompts):
        sizes.append(images.shape[0])
        return top_left_brightness(images, prompts)

    return CallableScorer(reward)


def test_max_batch_size_one_splits_guided_unet_halves(pipe):
    reference = generate(pipe, seed=6, max_batch_size=64)
    recorder = BatchSizeRecorder(pipe)
    try:
        output = generate(pipe, seed=6, max_batch_size=1)
    finally:
        recorder.remove()

    assert max(recorder.unet) == 1
    assert max(recorder.vae) == 1
    assert output.budget.unet_rows == reference.budget.unet_rows
    assert torch.allclose(torch.from_numpy(output.images), torch.from_numpy(reference.images), atol=1e-4)


def test_vae_and_scorer_batches_fill_max_batch_size(pipe):
    scorer_sizes = []
    recorder = BatchSizeRecorder(pipe)
    try:
        output = generate(pipe, num_images_per_prompt=2, num_candidates=3, max_batch_size=5,
                          scorer=size_recording_scorer(scorer_sizes))
    finally:
        recorder.remove()

    # Step 0 scores 2 x 3 x 2 = 12 rollouts, step 1 scores 2 x 3 x 1 = 6.
    assert scorer_sizes == [5, 5, 2, 5, 1]
    assert recorder.vae == [5, 5, 2, 5, 1, 2]
    assert max(recorder.unet) <= 5
    assert output.budget.scorer_calls == 5


def infinite_first_reward(images, prompts):
    rewards = top_left_brightness(images, prompts)
    rewards[0] = float("inf")
    return rewards


def test_nonfinite_rewards_warn_once_naming_steps(pipe, caplog):
    with caplog.at_level("WARNING"):
        output = generate(pipe, scorer=CallableScorer(infinite_first_reward))

    messages = [r.getMessage() for r in caplog.records if "non-finite rewards" in r.getMessage()]
    assert len(messages) == 1
    assert "2 rollout(s) had non-finite rewards (inf or -inf) at guided steps [0, 1]" in messages[0]
    assert [d.nonfinite_rollouts for d in output.trace] == [1, 1]
    assert output.trace[0].log_w[0, 0, 0] == -float("inf")


def test_perturbed_ddpm_warns_when_proposal_dominates(pipe, caplog):
    with caplog.at_level("WARNING"):
        output = generate(pipe, candidate_mode="perturbed", perturbation_scale=2.0, rollout_steps=1,
                          num_rollouts=1, guided_steps=[0, 1])

    messages = [r.getMessage() for r in caplog.records if "log p - log q spans" in r.getMessage()]
    assert len(messages) == 1
    assert "candidate_mode='ancestral'" in messages[0]
    spreads = [d.extra["proposal_log_ratio_spread"] for d in output.trace]
    assert all(spread.shape == (1,) for spread in spreads)
    assert max(float(spread.max()) for spread in spreads) > 20.0


def test_ancestral_mode_records_no_proposal_spread(pipe, caplog):
    with caplog.at_level("WARNING"):
        output = generate(pipe)

    assert all(d.extra["proposal_log_ratio_spread"] is None for d in output.trace)
    assert "log p - log q" not in caplog.text


@pytest.mark.parametrize("favoured", [0, 2])
def test_argmax_picks_the_rewarded_candidate(pipe, favoured):
    config = PowerSamplingConfig(num_candidates=3, num_rollouts=1, rollout_length=1, alpha=1.0, lam=0.1,
                                 estimator="plain", selection="argmax")
    output = generate(pipe, power_sampling_config=config, scorer=favour_index(favoured), num_candidates=None,
                      num_rollouts=None, rollout_steps=None)

    assert [d.chosen.tolist() for d in output.trace] == [[favoured], [favoured]]


def test_chosen_candidate_becomes_the_image(pipe):
    # With one guided step right before the last DDPM step, the last step lands on the
    # one-step x0 rollout of the chosen candidate, so the image must score like that rollout.
    config = PowerSamplingConfig(num_candidates=4, num_rollouts=1, rollout_length=1, alpha=1.0, lam=0.05,
                                 estimator="plain", selection="argmax")
    output = generate(pipe, power_sampling_config=config, guided_steps=[1], output_type="pt",
                      num_candidates=None, num_rollouts=None, rollout_steps=None)

    decision = output.trace[0]
    chosen = int(decision.chosen[0])
    image_reward = float(top_left_brightness(output.images, ["a cat"])[0])
    assert chosen == int(decision.rewards[0, :, 0].argmax())
    assert abs(image_reward - float(decision.rewards[0, chosen, 0])) < 1e-3
    assert decision.rewards[0, :, 0].unique().numel() == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_candidates=0), "num_candidates must be an integer >= 1"),
        (dict(guided_steps=[3]), "guided step 3 is out of range for num_inference_steps=3"),
        (dict(guided_steps=[0.0, 0.5]), "is a list, so its entries must be integer step indices, got 0.0; "
                                        "pass a window of fractions as a tuple"),
        (dict(guided_steps=2), "guided_steps must be 'all', a list of step indices .* or a \\(start, end\\) tuple"),
        (dict(guided_steps=(0, 2)), "0 <= start < end <= 1, got \\(0, 2\\); pass step indices as a list"),
        (dict(scorer_prompt=["a", "b"]), "one string or a list with one string per prompt \\(1\\), got a list of 2"),
        (dict(guided_steps=(0.5, 0.2)), "0 <= start < end <= 1"),
        (dict(generator=[torch.Generator().manual_seed(0)] * 3), "list of 3 generators, but the call makes 1"),
        (dict(candidate_mode="beam"), "candidate_mode must be one of"),
        (dict(power_sampling_config=PowerSamplingConfig(alpha=2.0, lam=1.0)), "alpha must be 1"),
        (dict(power_sampling_config="huge"), "unknown preset 'huge'"),
        (dict(rollout_scheduler="heun"), "rollout_scheduler must be one of"),
        (dict(scorer=None), "power sampling needs a scorer"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    if "scorer" in kwargs:
        pipe.scorer = None
    options = dict(num_inference_steps=3, output_type="np", num_candidates=2)
    options.update(kwargs)
    options.setdefault("generator", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **options)


def test_guided_steps_accept_numpy_integers():
    assert resolve_guided_steps(list(np.arange(2)), 3, "ancestral") == [0, 1]
    assert resolve_guided_steps(np.array([2, 0]), 3, "ancestral") == [0, 2]
    assert all(type(step) is int for step in resolve_guided_steps(list(np.arange(2)), 3, "ancestral"))


def test_incompatible_schedulers_raise(pipe, components):
    pipe.scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    with pytest.raises(ValueError, match="eta=0.0 is deterministic"):
        generate(pipe)

    pipe.scheduler = PNDMScheduler.from_config(components["scheduler"].config)
    with pytest.raises(ValueError, match="PNDMScheduler is not supported"):
        generate(pipe)

    pipe.scheduler = LCMScheduler.from_config(components["scheduler"].config)
    with pytest.raises(ValueError, match="LCMScheduler is not supported with candidate_mode='perturbed'"):
        generate(pipe, candidate_mode="perturbed")


@pytest.mark.parametrize(
    "scheduler_class, extra",
    [
        (DDIMScheduler, dict(eta=1.0)),
        (EulerAncestralDiscreteScheduler, {}),
        (LCMScheduler, dict(guidance_scale=1.0)),
        (TCDScheduler, dict(eta=0.3, guidance_scale=1.0)),
    ],
)
def test_main_schedulers_run_ancestral_candidates(pipe, components, scheduler_class, extra):
    pipe.scheduler = scheduler_class.from_config(components["scheduler"].config)
    output = generate(pipe, num_inference_steps=2, rollout_steps=1, num_rollouts=1, **extra)

    assert output.images.shape == (1, 32, 32, 3)
    assert len(output.trace) == 1
    assert torch.isfinite(output.trace[0].log_pi).all()


def test_perturbed_mode_records_densities(pipe):
    output = generate(pipe, candidate_mode="perturbed", num_candidates=3, rollout_steps=1, num_rollouts=1)

    # "all" includes the last step in perturbed mode: DDPM adds no noise there, so p has no density.
    assert [d.index for d in output.trace] == [0, 1, 2]
    stochastic = output.trace[0]
    assert stochastic.extra["target"] == "reward tilt of the base transition"
    assert stochastic.extra["log_q"].shape == (1, 3)
    assert not torch.equal(stochastic.log_p, stochastic.extra["log_q"])
    last = output.trace[-1]
    assert last.extra["target"] == "reward tilt of the perturbed proposal"
    assert last.extra["log_q"] is None


def test_perturbed_mode_with_deterministic_ddim(pipe, components):
    pipe.scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    output = generate(pipe, candidate_mode="perturbed", eta=0.0, rollout_steps=1, num_rollouts=1)

    assert all(d.extra["target"] == "reward tilt of the perturbed proposal" for d in output.trace)


def test_euler_ancestral_rollouts_with_rollout_unet(pipe, components):
    output = generate(pipe, rollout_scheduler="euler_ancestral", rollout_unet=components["unet"],
                      rollout_guidance_scale=0.0)

    assert output.trace[0].num_rollouts == 2
    assert output.trace[0].extra["rollouts_deterministic"] is False


def test_callback_sees_chosen_latents_and_can_replace_them(pipe):
    seen = []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["latents"].clone()))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    output = generate(pipe, output_type="latent", callback_on_step_end=on_step_end,
                      callback_on_step_end_tensor_inputs=["latents"])

    assert [step for step, _ in seen] == [0, 1, 2]
    assert seen[0][1].shape == (1, 4, 16, 16)
    assert output.images.shape == (1, 4, 16, 16)
    assert torch.count_nonzero(output.images) == 0


@pytest.mark.parametrize("output_type, expected_type", [("pil", list), ("pt", torch.Tensor), ("np", np.ndarray)])
def test_output_types(pipe, output_type, expected_type):
    output = generate(pipe, output_type=output_type, num_inference_steps=2, rollout_steps=1, num_rollouts=1)

    assert isinstance(output.images, expected_type)
    images, nsfw, trace, budget = generate(pipe, output_type=output_type, num_inference_steps=2,
                                           rollout_steps=1, num_rollouts=1, return_dict=False)
    assert isinstance(images, expected_type)
    assert len(trace) == 1
    assert budget.decisions == 1


def test_from_pipe_registers_scorer(components):
    base = StableDiffusionPipeline(**components, requires_safety_checker=False)
    scorer = favour_index(1)
    pipe = PowerSamplingStableDiffusionPipeline.from_pipe(base, scorer=scorer)

    assert pipe.scorer is scorer
    assert pipe.unet is base.unet
    assert pipe.device == base.device


def test_custom_pipeline_loads_saved_pipeline(components, tmp_path):
    base = StableDiffusionPipeline(**components, requires_safety_checker=False)
    base.save_pretrained(tmp_path / "tiny-sd")
    scorer = brightness_scorer()
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "tiny-sd",
        custom_pipeline=str(PIPELINE_FILE),
        trust_remote_code=True,
        scorer=scorer,
    )
    pipe.set_progress_bar_config(disable=True)

    assert type(pipe).__name__ == "PowerSamplingStableDiffusionPipeline"
    assert pipe.scorer is scorer
    output = generate(pipe, num_inference_steps=2, rollout_steps=1, num_rollouts=1)
    assert output.images.shape == (1, 32, 32, 3)
    assert len(output.trace) == 1


def generate_one_step(pipe, reuse, **kwargs):
    pipe._reuse_rollout_prediction = reuse
    options = dict(seed=2, num_inference_steps=4, num_candidates=3, num_rollouts=1, rollout_steps=1,
                   num_images_per_prompt=2)
    options.update(kwargs)
    return generate(pipe, **options)


def test_one_step_rollout_reuse_keeps_images(pipe):
    without = generate_one_step(pipe, reuse=False)
    reused = generate_one_step(pipe, reuse=True)

    assert [d.chosen.tolist() for d in reused.trace] == [d.chosen.tolist() for d in without.trace]
    assert abs(reused.images - without.images).max() <= 1e-5


def test_one_step_rollout_reuse_saves_rows(pipe):
    without = generate_one_step(pipe, reuse=False)
    reused = generate_one_step(pipe, reuse=True)

    # Guided steps 0, 1 and 2 each hand the next step its prediction: 2 images x 2 guidance rows apiece.
    assert [d.index for d in reused.trace] == [0, 1, 2]
    assert all(d.extra["reused_noise_pred"] for d in reused.trace)
    assert not any(d.extra["reused_noise_pred"] for d in without.trace)
    assert without.budget.unet_rows - reused.budget.unet_rows == 3 * 2 * 2
    assert without.budget.unet_calls - reused.budget.unet_calls == 3


def test_one_step_rollout_reuse_keeps_images_with_ddim(pipe, components):
    pipe.scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    without = generate_one_step(pipe, reuse=False, eta=1.0)
    reused = generate_one_step(pipe, reuse=True, eta=1.0)

    assert all(d.extra["reused_noise_pred"] for d in reused.trace)
    assert abs(reused.images - without.images).max() <= 1e-5
    assert without.budget.unet_rows - reused.budget.unet_rows == 3 * 2 * 2


def test_no_reuse_with_rollout_unet(pipe, components):
    rollout_unet = UNet2DConditionModel.from_config(components["unet"].config).eval()
    rollout_unet.load_state_dict(components["unet"].state_dict())

    output = generate_one_step(pipe, reuse=True, rollout_unet=rollout_unet)

    assert not any(d.extra["reused_noise_pred"] for d in output.trace)
    # Per image and guidance branch: 4 main steps and 3 candidates at each of 3 guided steps.
    assert output.budget.unet_rows == 2 * 2 * (4 + 3 * 3)


def test_no_reuse_with_own_rollout_guidance(pipe):
    output = generate_one_step(pipe, reuse=True, rollout_guidance_scale=3.0)

    assert not any(d.extra["reused_noise_pred"] for d in output.trace)


def test_no_reuse_with_multi_step_rollouts(pipe):
    output = generate_one_step(pipe, reuse=True, rollout_steps=2)

    assert not any(d.extra["reused_noise_pred"] for d in output.trace)
    # Per image and guidance branch: 4 main steps; rollouts of 2, 2 and 1 steps for 3 candidates.
    assert output.budget.unet_rows == 2 * 2 * (4 + 3 * (2 + 2 + 1))


def test_no_reuse_after_callback_changes_latents(pipe):
    def shift_latents(pipeline, step, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] + 0.1}

    def observe(pipeline, step, timestep, callback_kwargs):
        return {}

    shifted = generate_one_step(pipe, reuse=True, callback_on_step_end=shift_latents)
    observed = generate_one_step(pipe, reuse=True, callback_on_step_end=observe)

    assert not any(d.extra["reused_noise_pred"] for d in shifted.trace)
    assert shifted.budget.unet_rows == 2 * 2 * (4 + 3 * 3)
    assert all(d.extra["reused_noise_pred"] for d in observed.trace)
