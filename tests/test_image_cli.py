"""psdiffusion image: argument checks and the results file on the bundled test bed."""

import json

import pytest
import torch

from psdiffusion import cli


def run_image(*arguments):
    return cli.main(["image", *arguments])


def test_unknown_preset_is_rejected_before_loading():
    with pytest.raises(SystemExit):
        run_image("--prompt", "a 7", "--preset", "bogus")


def test_zero_steps_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        run_image("--prompt", "a 7", "--steps", "0", "--out", str(tmp_path))


def test_rerun_replaces_records_of_rewritten_images(tmp_path):
    torch.set_num_threads(1)
    arguments = ("--prompt", "a handwritten digit seven", "--method", "base", "--out", str(tmp_path))
    assert run_image(*arguments) == 0
    assert run_image(*arguments) == 0
    assert run_image(*arguments[:-2], "--seed", "1", "--out", str(tmp_path)) == 0

    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    files = [record["file"] for record in records]
    assert len(records) == 2
    assert sorted(files) == sorted(set(files))
    for record in records:
        assert (tmp_path / record["file"]).is_file()
        assert {"prompt", "seed", "method", "file", "reward", "nfe", "seconds", "judge_correct"} <= set(record)
