"""The main job of ``make demo``: base against power-sampled digits, then a short power-sampled text decode.

Writes into ``outputs/demo/``: ``grid.png`` (top row base, bottom row power
sampling, same seeds), ``results.jsonl`` (rewards, cost and the judge's
verdicts), ``reward_by_step.png`` (rollout rewards against denoising step,
from the power-sampling trace) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import cli

PROMPT = "a handwritten digit seven"
TEXT_PROMPT = "Name three primary colors."


def _load_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_grid(records: list[dict], folder: Path, scale: int = 4) -> Path:
    """Lay the base images over the power-sampled ones, seed by seed, upscaled and labelled."""
    from PIL import Image, ImageDraw

    rows = [[r for r in records if r["method"] == method] for method in ("base", "power")]
    tiles = [[Image.open(folder / r["file"]) for r in row] for row in rows]
    width, height = tiles[0][0].size
    tile_w, tile_h = width * scale, height * scale
    margin, caption = 48, 24
    grid = Image.new("RGB", (margin + tile_w * len(tiles[0]), (tile_h + caption) * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for row_index, (row, row_records) in enumerate(zip(tiles, rows)):
        top = row_index * (tile_h + caption)
        draw.text((4, top + tile_h // 2), row_records[0]["method"], fill="black")
        for column, (tile, record) in enumerate(zip(row, row_records)):
            left = margin + column * tile_w
            grid.paste(tile.resize((tile_w, tile_h), Image.NEAREST), (left, top))
            verdict = ""
            if "judge_digit" in record:
                verdict = f" judge {record['judge_digit']}"
            draw.text((left + 4, top + tile_h + 4), f"seed {record['seed']} r={record['reward']:.0f}{verdict}",
                      fill="black")
    path = folder / "grid.png"
    grid.save(path)
    return path


def write_reward_plot(records: list[dict], folder: Path) -> Path:
    """Plot the mean rollout reward and the chosen candidate's reward at each guided step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    power_records = [r for r in records if r["method"] == "power" and r.get("trace")]
    for index, record in enumerate(power_records):
        color = f"C{index}"
        steps = [row["step"] for row in record["trace"]]
        axes.plot(steps, [row["chosen_reward"] for row in record["trace"]], color=color,
                  label=f"chosen, seed {record['seed']}")
        axes.plot(steps, [row["mean_reward"] for row in record["trace"]], linestyle=":", color=color)
    axes.set_xlabel("denoising step")
    axes.set_ylabel("CLIP reward of rollouts")
    axes.set_title("Rollout reward by step (dotted: mean over all candidates, same colour)", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = folder / "reward_by_step.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def summarize(records: list[dict]) -> dict:
    summary = {}
    for method in ("base", "power"):
        rows = [r for r in records if r["method"] == method]
        summary[method] = {
            "images": len(rows),
            "mean_reward": sum(r["reward"] for r in rows) / len(rows),
            "judged_correct": sum(bool(r.get("judge_correct")) for r in rows),
            "mean_nfe": sum(r["nfe"] for r in rows) / len(rows),
            "mean_seconds": sum(r["seconds"] for r in rows) / len(rows),
        }
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the psdiffusion demo on the bundled models.")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--num-images", type=int, default=8, help="seeds per method (default: 8)")
    parser.add_argument("--skip-text", action="store_true", help="leave out the SmolLM2 text decode")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    for method in ("base", "power"):
        print(f"\n== psdiffusion image --prompt {PROMPT!r} --method {method}")
        cli.main(["image", "--prompt", PROMPT, "--method", method, "--num-images", str(args.num_images),
                  "--preset", "minimal", "--out", str(args.out), "--save-trace"])

    records = _load_records(args.out / "results.jsonl")
    grid = write_grid(records, args.out)
    plot = write_reward_plot(records, args.out)
    summary = summarize(records)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nimages: {grid} (top: base, bottom: power sampling)\nreward plot: {plot}")
    for method, row in summary.items():
        print(f"{method:6s} mean CLIP reward {row['mean_reward']:.2f}, judged correct {row['judged_correct']}/"
              f"{row['images']}, {row['mean_nfe']:.0f} UNet rows and {row['mean_seconds']:.1f} s per image")

    if not args.skip_text:
        print(f"\n== psdiffusion text --prompt {TEXT_PROMPT!r} --method power")
        cli.main(["text", "--prompt", TEXT_PROMPT, "--method", "power", "--preset", "minimal",
                  "--max-new-tokens", "24", "--seed", "0"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
