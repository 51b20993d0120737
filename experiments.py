"""Ablations on ShapesWorld: which design choices let the tiny VLM see, and what do they cost?

Each sweep trains the tiny model from scratch once per variant, both stages, with the same number of
training samples, then scores held-out questions with the images and blind (images replaced by zeros). It
writes a markdown table and a bar chart to docs/experiments/:

    python experiments.py projector --budget-minutes 30    # linear vs mlp2x_gelu vs pixel_shuffle
    python experiments.py data-scale --budget-minutes 30   # accuracy against distinct training scenes
    python experiments.py resolution --budget-minutes 30   # image size / patch size: accuracy and speed
    python experiments.py all --smoke                      # seconds: checks the plumbing, figures mean nothing

The budget sets the training length: each run gets budget / runs minutes, as a share of the main job's
schedule (which takes MAIN_JOB_MINUTES here); steps, not the clock, end a run, so results repeat exactly.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import train
from eval import shapes_scores
from model import VLMConfig

MAIN_JOB_MINUTES = 9.0  # `python train.py` on 2 cores of the machine the committed results came from

# Each variant is a list of `train.py --set` items on top of the main job's tiny model and ShapesWorld.
SWEEPS = {
    "projector": {  # at 8 px patches (a 6x6 grid), so that pixel shuffle can merge 2x2 neighbours
        "linear": ["vision.patch_size=8", "projector.kind=linear"],
        "mlp2x_gelu": ["vision.patch_size=8", "projector.kind=mlp2x_gelu"],
        "pixel_shuffle": ["vision.patch_size=8", "projector.kind=pixel_shuffle", "projector.shuffle_factor=2"],
    },
    "data-scale": {  # distinct training scenes; every run sees the same number of samples
        "500 scenes": ["world.train_size=500"],
        "2,000 scenes": ["world.train_size=2000"],
        "8,000 scenes": ["world.train_size=8000"],
        "unlimited": ["world.train_size=0"],
    },
    "resolution": {  # image size / patch size: the image-token count sets the cost
        "32 px / 16": ["vision.image_size=32", "vision.patch_size=16"],
        "48 px / 16": ["vision.image_size=48", "vision.patch_size=16"],
        "48 px / 8": ["vision.image_size=48", "vision.patch_size=8"],
        "96 px / 16": ["vision.image_size=96", "vision.patch_size=16"],
    },
}


def stage_steps(budget_minutes: float, runs: int) -> dict:
    """{stage: max steps} for one run: the main job's schedule scaled to budget / runs minutes."""
    scale = budget_minutes / runs / MAIN_JOB_MINUTES
    return {stage: max(1, round(scale * int(args[args.index("--max-steps") + 1])))
            for stage, args in train.MAIN_JOB.items()}


def run_variant(sets: list[str], out: Path, steps: dict, eval_samples: int) -> dict:
    """Train both stages with the main job's flags (but `steps`) and these --set items; score held-out."""
    flags = [f"--set={item}" for item in sets] + ["--save-every", "100000", "--keep", "1"]
    t0 = time.time()
    ckpt = None
    for stage in ("pretrain", "finetune"):
        args = train.MAIN_JOB[stage] + ["--max-steps", str(steps[stage])]  # argparse: the last one wins
        init = [] if ckpt is None else ["--init", str(ckpt)]
        ckpt = train.train(train.parse_args(["--stage", stage] + args + init + flags + ["--out", str(out / stage)]))
    minutes = (time.time() - t0) / 60
    normal, blind = shapes_scores(ckpt, eval_samples)
    cfg = json.loads((ckpt / "config.json").read_text())
    image_tokens = VLMConfig.from_dict(cfg).num_image_tokens
    return {"heldout": normal["accuracy"], "blind": blind["accuracy"], "image_tokens": image_tokens,
            "train_minutes": minutes, "by_category": {k: c / t for k, (c, t) in normal["by_category"].items()}}


def bar_chart(rows: dict, title: str, path: Path):
    """Held-out and blind accuracy per variant, as paired bars (Pillow only, like sample.py's maps)."""
    W, H, left, bottom, top = 640, 360, 50, 60, 40
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    plot_h = H - top - bottom
    for tick in range(0, 11, 2):  # accuracy axis, 0 to 1
        y = top + plot_h * (1 - tick / 10)
        draw.line([(left, y), (W - 10, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick / 10:.1f}", fill="black")
    slot = (W - left - 10) / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        x = left + i * slot + slot * 0.15
        for j, (key, color) in enumerate((("heldout", (50, 100, 235)), ("blind", (190, 190, 190)))):
            x0 = x + j * slot * 0.35
            draw.rectangle([x0, top + plot_h * (1 - row[key]), x0 + slot * 0.3, top + plot_h], fill=color)
            draw.text((x0, top + plot_h * (1 - row[key]) - 12), f"{row[key]:.2f}", fill="black")
        draw.text((x, H - bottom + 8), name, fill="black")
    draw.rectangle([W - 170, 12, W - 160, 22], fill=(50, 100, 235))
    draw.text((W - 155, 12), "held-out", fill="black")
    draw.rectangle([W - 90, 12, W - 80, 22], fill=(190, 190, 190))
    draw.text((W - 75, 12), "blind", fill="black")
    image.save(path)


def write_results(sweep: str, rows: dict, steps: dict, eval_samples: int, command: str, out: Path):
    categories = sorted({c for row in rows.values() for c in row["by_category"]})
    lines = [f"# {sweep}", "", f"Reproduce: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}. Each run: {steps['pretrain']} caption steps + {steps['finetune']} "
             f"question steps of batch 32, then {eval_samples} held-out questions; blind = images replaced by zeros.",
             "", f"![{sweep}]({sweep}.png)", "",
             "| variant | image tokens | held-out | blind | " + " | ".join(categories) + " | train min |",
             "|---|---:|---:|---:|" + "---:|" * len(categories) + "---:|"]
    for name, row in rows.items():
        per = " | ".join(f"{row['by_category'].get(c, 0):.2f}" for c in categories)
        lines.append(f"| {name} | {row['image_tokens']} | {row['heldout']:.3f} | {row['blind']:.3f} | {per} | "
                     f"{row['train_minutes']:.1f} |")
    (out / f"{sweep}.md").write_text("\n".join(lines) + "\n")
    (out / f"{sweep}.json").write_text(json.dumps(rows, indent=1) + "\n")
    bar_chart(rows, f"{sweep}: held-out vs blind accuracy", out / f"{sweep}.png")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sweep", choices=list(SWEEPS) + ["all"], help="which comparison to run")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training time of the whole sweep")
    p.add_argument("--eval-samples", type=int, default=500, help="held-out questions per run")
    p.add_argument("--smoke", action="store_true", help="2 steps per stage and 8 questions: a plumbing check")
    p.add_argument("--out", type=Path, help="tables and plots (default: docs/experiments, or "
                   "out/experiments_smoke with --smoke)")
    p.add_argument("--work", type=Path, default=Path("out/experiments"), help="checkpoints of each run")
    args = p.parse_args(argv)
    out = args.out or Path("out/experiments_smoke" if args.smoke else "docs/experiments")
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments.py " + " ".join(argv)
    for sweep in SWEEPS if args.sweep == "all" else [args.sweep]:
        variants = SWEEPS[sweep]
        steps = {"pretrain": 2, "finetune": 2} if args.smoke else stage_steps(args.budget_minutes, len(variants))
        eval_samples = 8 if args.smoke else args.eval_samples
        rows = {}
        for name, sets in variants.items():
            work = args.work / sweep / name.replace(" ", "_").replace(",", "").replace("/", "_")
            shutil.rmtree(work, ignore_errors=True)
            print(f"== {sweep}: {name} ({' '.join(sets)})", flush=True)
            rows[name] = run_variant(sets, work, steps, eval_samples)
            print(f"== {name}: held-out {rows[name]['heldout']:.3f}, blind {rows[name]['blind']:.3f}", flush=True)
        write_results(sweep, rows, steps, eval_samples, command, out)
        print(f"{sweep}: wrote {out / sweep}.md and .png")


if __name__ == "__main__":
    main()
