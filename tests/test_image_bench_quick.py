"""``psdiffusion bench image --quick`` end to end on the bundled digits test bed."""

import json

import pytest

from psdiffusion import cli
from psdiffusion.image_bench import METHODS

QUICK_LIMIT_SECONDS = 180


@pytest.mark.slow
def test_quick_image_benchmark_writes_report(tmp_path):
    exit_code = cli.main(["bench", "image", "--quick", "--threads", "1", "--out", str(tmp_path)])

    assert exit_code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["total_seconds"] < QUICK_LIMIT_SECONDS
    rows = {(row["method"], row["multiple"]) for row in results["summary"]}
    assert {(method, 4) for method in METHODS} <= rows
    assert all(row["units"] == 20 for row in results["summary"])
    for row in results["summary"]:
        assert row["nfe"] <= row["multiple"] * results["base_rows"]
    half = {(item["method"], item["power_multiple"]) for item in results["power_at_half_budget_vs_best_of_n"]}
    assert half == {("power-1step", 2), ("power-rollout", 2)}
    for name in ("table.md", "reward_vs_nfe.png", "accuracy_vs_nfe.png", "grids/base_1x.png", "grids/svdd_4x.png"):
        assert (tmp_path / name).is_file(), name
