"""experiments.py: each sweep runs end to end in smoke mode and writes its table, data and chart."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import experiments
from model import tiny_config


@pytest.mark.parametrize("sweep", list(experiments.SWEEPS))
def test_smoke_run_writes_table_json_and_chart(sweep, tmp_path):
    experiments.main([sweep, "--smoke", "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "runs")])
    rows = json.loads((tmp_path / "docs" / f"{sweep}.json").read_text())
    assert list(rows) == list(experiments.SWEEPS[sweep])
    for row in rows.values():
        assert 0 <= row["blind"] <= 1 and 0 <= row["heldout"] <= 1 and row["train_minutes"] > 0
    table = (tmp_path / "docs" / f"{sweep}.md").read_text()
    assert f"python experiments.py {sweep} --smoke" in table
    assert all(f"| {name} |" in table for name in rows)
    assert Image.open(tmp_path / "docs" / f"{sweep}.png").size == (640, 360)
    if sweep == "projector":  # pixel shuffle merges 2 x 2 patches: 4x fewer image tokens
        assert rows["pixel_shuffle"]["image_tokens"] * 4 == rows["linear"]["image_tokens"]


def test_budget_scales_the_main_job_schedule():
    steps = experiments.stage_steps(experiments.MAIN_JOB_MINUTES * 3, runs=3)  # one main job's time per run
    assert steps == {stage: int(args[args.index("--max-steps") + 1]) for stage, args in
                     experiments.train.MAIN_JOB.items()}


def test_binding_sweep_splits_across_calls_reuses_results_and_reports(tmp_path):
    common = ["binding", "--smoke", "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "runs")]
    experiments.main(common + ["--variants", "canon k3"])
    assert not (tmp_path / "docs" / "binding.md").exists()  # a partial sweep leaves the report to a full call
    canon = tmp_path / "runs" / "binding" / "canon_k3"
    assert json.loads((canon / "ft" / "config.json").read_text())["lm"]["conv_kernel"] == 3  # the lever trained
    first = (canon / "result.json").stat().st_mtime_ns
    experiments.main(common)  # runs the baseline, reads canon k3 back
    assert (canon / "result.json").stat().st_mtime_ns == first
    (tmp_path / "docs" / "binding.md").unlink()
    experiments.main(common + ["--report"])  # trains nothing, writes the same report
    rows = json.loads((tmp_path / "docs" / "binding.json").read_text())
    assert list(rows) == ["baseline", "canon k3"]
    assert all(0 <= row["binding_errors"] <= row["wrong"] <= 8 for row in rows.values())
    assert "binding errors/wrong" in (tmp_path / "docs" / "binding.md").read_text()


def test_binding_scratch_variant_trains_its_own_tower_through_both_stages(tmp_path):
    """A tower change cannot be inserted into a pretrained model: a scratch variant runs both stages itself."""
    name = "scratch: 16 px conv stem ViT depth 0"
    experiments.main(["binding", "--smoke", "--variants", name, "--out", str(tmp_path / "docs"),
                      "--work", str(tmp_path / "runs")])
    run = tmp_path / "runs" / "binding" / "scratch_16_px_conv_stem_ViT_depth_0"
    vision = json.loads((run / "pretrain" / "config.json").read_text())["vision"]
    assert (vision["conv_stem"], vision["patch_size"], vision["depth"]) == ([24, 48, 96, 192], 16, 0)
    assert not (tmp_path / "runs" / "binding" / "pretrain").exists()  # no shared pretraining was needed
    row = json.loads((run / "result.json").read_text())["row"]
    assert row["image_tokens"] == 9 and 0 <= row["binding_errors"] <= row["wrong"] <= 8
    assert row["scratch"].startswith("2 caption + 2 question steps from scratch, 8 held-out questions, --set ")
    assert row["scratch"].endswith("--set vision.conv_stem=[24,48,96,192]")


@pytest.mark.slow
def test_binding_control_trains_a_fresh_tower_before_the_frozen_real_lm(smollm2_gguf, tmp_path):
    """The control converts SmolLM2 with a from-scratch tiny tower, trains the tower and projector on captions with
    the LM frozen, then adds LoRA on questions, and reports like any variant (~100 s: a 135M LM on CPU)."""
    name = "control: SmolLM2-135M + LoRA"
    experiments.main(["binding", "--smoke", "--variants", name, "--control-lm", str(smollm2_gguf),
                      "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "runs")])
    run = tmp_path / "runs" / "binding" / "control_SmolLM2-135M__LoRA"
    init, pretrain = (load_file(run / stage / "model.safetensors") for stage in ("init", "pretrain"))
    assert all(torch.equal(v, pretrain[k]) for k, v in init.items() if k.startswith("lm."))  # frozen
    assert not torch.equal(init["vision.patch_embed.weight"], pretrain["vision.patch_embed.weight"])  # trained
    assert (run / "finetune" / "adapter.safetensors").is_file()
    assert json.loads((run / "finetune" / "config.json").read_text())["template"] == "chatml"
    row = json.loads((run / "result.json").read_text())["row"]
    assert row["image_tokens"] == 36 and 0 <= row["binding_errors"] <= row["wrong"] <= 8
    assert row["budget"].startswith("2 caption + 2 question steps")


def test_the_main_job_variant_is_the_model_python_train_py_trains():
    """binding's "(the main job)" row names its model and finetune in full: train.MAIN_JOB's --set items and flags;
    UNGROUNDED keeps every older row's finetune as it ran."""
    pretrain = experiments.train.MAIN_JOB["pretrain"]
    sets = [pretrain[k + 1] for k, flag in enumerate(pretrain) if flag == "--set"]
    configure, parse = experiments.train.configure, experiments.train.parse_sets
    main_job = configure(tiny_config(), parse(sets)[0])
    assert configure(tiny_config(), parse(experiments.MAIN_JOB_MODEL)[0]) == main_job
    assert configure(tiny_config(), parse(experiments.PLAIN_TINY)[0]) == tiny_config()
    (name,) = [name for name in experiments.BINDING if name.endswith("(the main job)")]
    variant, parse_args = experiments.BINDING[name], experiments.train.parse_args
    assert configure(tiny_config(), parse(variant["scratch"])[0]) == main_job
    ours = parse_args(["--stage", "finetune"] + experiments.train.MAIN_JOB["finetune"] + variant["flags"])
    want = parse_args(["--stage", "finetune"] + experiments.train.MAIN_JOB["finetune"])
    assert vars(ours) == vars(want)  # the same finetune: grounding weight, question words, what trains
    old = parse_args(["--stage", "finetune"] + experiments.train.MAIN_JOB["finetune"] + experiments.UNGROUNDED)
    assert (old.ground, old.ground_words, old.train) == (0, False, "vision,projector,lm")  # as before session 8
