"""The ``psdiffusion text`` subcommand, run on a tiny model in place of SmolLM2."""

import json

import pytest

from lm_helpers import CharTokenizer, tiny_llama
from psdiffusion import cli as root_cli
from psdiffusion.lm import smollm2


@pytest.fixture
def tiny_loader(monkeypatch):
    model = tiny_llama(seed=0, logit_scale=4.0)
    monkeypatch.setattr(smollm2, "load_model", lambda path=None: (model, CharTokenizer()))


def run_cli(capsys, *argv):
    code = root_cli.main(["text", *argv])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("method", ["greedy", "sample", "low-temp", "power", "best-of-n", "self-consistency",
                                    "beam", "mcmc"])
def test_json_output_has_text_method_seed_budget(tiny_loader, capsys, method):
    code, out = run_cli(capsys, "--prompt", "abc", "--method", method, "--preset", "minimal",
                        "--max-new-tokens", "4", "--seed", "3", "--n", "2", "--json")
    record = json.loads(out)
    assert code == 0
    assert record["method"] == method
    assert record["seed"] == 3
    assert isinstance(record["text"], str)
    assert record["budget"]["forward_rows"] > 0


def test_power_streams_text_then_prints_budget(tiny_loader, capsys):
    code, out = run_cli(capsys, "--prompt", "abc", "--preset", "minimal", "--max-new-tokens", "4")
    assert code == 0
    assert "[power]" in out
    assert "sampled tokens" in out


def test_same_seed_gives_same_json(tiny_loader, capsys):
    argv = ("--prompt", "abc", "--preset", "minimal", "--max-new-tokens", "4", "--seed", "5", "--json")
    first = json.loads(run_cli(capsys, *argv)[1])
    second = json.loads(run_cli(capsys, *argv)[1])
    assert first["token_ids"] == second["token_ids"]


@pytest.mark.parametrize("argv, message", [
    (("--prompt", " "), "--prompt is empty"),
    (("--prompt", "abc", "--max-new-tokens", "0"), "--max-new-tokens must be > 0"),
    (("--prompt", "abc", "--alpha", "-1"), "alpha must be a finite number > 0"),
])
def test_bad_arguments_exit_with_message(tiny_loader, argv, message):
    with pytest.raises(SystemExit, match=message):
        root_cli.main(["text", *argv])


def test_missing_model_folder_gives_clear_error():
    from psdiffusion import cli

    with pytest.raises(SystemExit, match="model folder not found"):
        cli.main(["text", "--prompt", "Hi", "--model", "/nonexistent/model-folder"])
