"""Statistical check on the bundled test bed: power sampling raises judged accuracy over base sampling."""

import pytest
import torch

from psdiffusion import testbed
from psdiffusion.image_jobs import ImageJob

DIGIT_PROMPTS = [f"a handwritten digit {word}" for word in testbed.DIGIT_WORDS]
SEEDS = range(6)


def paired_bootstrap_interval(differences: torch.Tensor, resamples: int = 2000, seed: int = 0):
    """95% percentile interval of the mean of paired differences."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(differences), (resamples, len(differences)), generator=generator)
    means = differences[index].mean(dim=1)
    return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()


@pytest.mark.slow
def test_power_sampling_beats_base_on_judged_accuracy():
    torch.set_num_threads(1)
    job = ImageJob.create(preset="minimal")
    correct = {"base": [], "power": []}
    for prompt in DIGIT_PROMPTS:
        for seed in SEEDS:
            for method in correct:
                result = job.generate(prompt, seed, method)
                correct[method].append(float(result.extra["judge_correct"]))

    base = torch.tensor(correct["base"])
    power = torch.tensor(correct["power"])
    low, high = paired_bootstrap_interval(power - base)
    print(f"judged accuracy: base {base.mean():.3f}, power {power.mean():.3f}, "
          f"difference 95% CI [{low:.3f}, {high:.3f}] over {len(base)} paired images")
    assert len(base) == 10 * len(SEEDS)
    assert power.mean() > base.mean()
    assert low > 0.0
