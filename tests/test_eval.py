"""eval.py: answer normalisation, batched greedy decoding equal to one-at-a-time generate, --blind, the
predictions file and the accuracy line, and one-line errors for a missing checkpoint, bad JSON or tokenizer."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_init

import eval as vlm_eval
import sample
from data import ShapesDataset, ShapesWorld, export_shapes, preprocess
from llama import LlamaConfig
from model import VLM, VLMConfig
from projector import ProjectorConfig
from tokenizer import IGNORE, SYSTEM, build_prompt, tokenize_prompt, train_tokenizer
from vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random micro VLM with a ShapesWorld tokenizer: enough to test the plumbing, not the accuracy."""
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_tokenizer(ShapesWorld().texts(300), 400, path / "tokenizer.model")
    vision = ViTConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
    lm = LlamaConfig(vocab_size=tokenizer.vocab_size + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                     max_seq_len=256)
    torch.manual_seed(0)
    VLM(VLMConfig(vision, lm, ProjectorConfig(), image_token_id=tokenizer.vocab_size)).save_pretrained(path)
    return path


def run_eval(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("answer, expected", [
    ("Two.", "2"), ("the Red circle", "red circle"), ("  Top-Left ", "top left"), ("A square!", "square"),
    ("an apple, an egg", "apple egg"), ("eleven", "11"), ("Yes", "yes"), ("3", "3"), ("theatre", "theatre"),
])
def test_normalize(answer, expected):
    assert vlm_eval.normalize(answer) == expected


def test_batched_left_padded_answers_equal_one_at_a_time_generate(checkpoint):
    model, tokenizer = vlm_eval.load_checkpoint(checkpoint, "cpu")
    records = vlm_eval.shapes_records(6, ShapesWorld(image_size=16))
    result = vlm_eval.evaluate_qa(model, tokenizer, records, batch_size=4, max_new_tokens=5)
    assert len({len(tokenize_prompt(tokenizer, build_prompt(r["conversations"][:1]), 0, 1)) for r in records}) > 1
    for record, prediction in zip(records, result["predictions"], strict=True):
        ids = tokenize_prompt(tokenizer, build_prompt(record["conversations"][:1]), model.cfg.image_token_id,
                              model.cfg.num_image_tokens)
        pixels = preprocess(record["images"][0], model.cfg.vision)[None]
        tokens = model.generate(torch.tensor([ids]), pixels, max_new_tokens=5, eos_id=tokenizer.eos_id)[0].tolist()
        tokens = tokens[:tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
        assert prediction["prediction"] == tokenizer.decode(tokens).strip()
        assert prediction["reference"] == record["conversations"][1]["value"]


@pytest.mark.slow
def test_compiled_static_cache_decoding_gives_the_eager_answers(checkpoint):
    """eval.py --compile: one full-context cache per batch size (4, then the last 2), reused by every batch."""
    model, tokenizer = vlm_eval.load_checkpoint(checkpoint, "cpu")
    random_init(model)  # larger random weights: answers that depend on the question, so a stale cache shows
    records = vlm_eval.shapes_records(10, ShapesWorld(image_size=16))
    eager = vlm_eval.evaluate_qa(model, tokenizer, records, batch_size=4, max_new_tokens=8)
    model.compile_decode_step()
    compiled = vlm_eval.evaluate_qa(model, tokenizer, records, batch_size=4, max_new_tokens=8, static=True)
    assert len({p["prediction"] for p in eager["predictions"]}) > 1
    assert [p["prediction"] for p in compiled["predictions"]] == [p["prediction"] for p in eager["predictions"]]


def test_text_only_questions_are_answered_without_images(checkpoint):
    model, tokenizer = vlm_eval.load_checkpoint(checkpoint, "cpu")
    records = [{"id": str(i), "images": [], "conversations": [{"from": "human", "value": q},
                                                              {"from": "gpt", "value": "red"}]}
               for i, q in enumerate(["What color is red?", "Name a shape, please."])]
    result = vlm_eval.evaluate_qa(model, tokenizer, records, batch_size=2, max_new_tokens=5)
    for record, prediction in zip(records, result["predictions"], strict=True):
        ids = tokenize_prompt(tokenizer, build_prompt(record["conversations"][:1]), model.cfg.image_token_id,
                              model.cfg.num_image_tokens)
        tokens = model.generate(torch.tensor([ids]), None, max_new_tokens=5, eos_id=tokenizer.stop_ids)[0].tolist()
        assert prediction["prediction"] == tokenizer.decode(tokenizer.until_stop(tokens)).strip()


def test_blind_replaces_images_with_zeros(checkpoint, monkeypatch):
    model, tokenizer = vlm_eval.load_checkpoint(checkpoint, "cpu")
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, pixels, **kw: seen.append(pixels) or generate(ids, pixels, **kw))
    records = vlm_eval.shapes_records(3, ShapesWorld(image_size=16))
    vlm_eval.evaluate_qa(model, tokenizer, records, blind=True, max_new_tokens=2)
    vlm_eval.evaluate_qa(model, tokenizer, records, max_new_tokens=2)
    assert seen[0].shape == seen[1].shape == (3, 3, 16, 16)
    assert not seen[0].any() and seen[1].any()


def test_binding_errors_are_wrong_answers_that_describe_another_object(checkpoint, monkeypatch):
    world = ShapesWorld(image_size=16)
    records = vlm_eval.shapes_records(80, world)
    for i, record in enumerate(records):  # others, derived again from the question and the scene
        question, answer = record["conversations"][0]["value"].split("\n")[1], record["conversations"][1]["value"]
        scene = world.scene(i, "test")
        template = {"color": "What color is the {o.shape}?", "shape": "What shape is the {o.color} object?",
                    "position": "Where is the {o.color} {o.shape}?"}.get(record["category"])
        if template is None:
            assert record["others"] == []
            continue
        [target] = [o for o in scene if question == template.format(o=o)]
        field = record["category"]
        assert getattr(target, field) == answer
        assert record["others"] == sorted({getattr(o, field) for o in scene if o is not target} - {answer})
    picked = [r for r in records if r["others"]][:3]
    assert len(picked) == 3
    replies = [picked[0]["others"][0], picked[1]["conversations"][1]["value"], "zebra"]  # binding, right, other
    model, tokenizer = vlm_eval.load_checkpoint(checkpoint, "cpu")
    answers = torch.tensor([tokenizer.encode(r) + [tokenizer.eos_id] * (6 - len(tokenizer.encode(r))) for r in replies])
    monkeypatch.setattr(model, "generate", lambda ids, pixels, **kw: answers)
    result = vlm_eval.evaluate_qa(model, tokenizer, picked)
    assert [(p["correct"], p["binding_error"]) for p in result["predictions"]] == [(False, True), (True, False),
                                                                                  (False, False)]
    assert "binding errors/wrong" in vlm_eval.category_table(result)
    result = vlm_eval.evaluate_qa(model, tokenizer, [{k: v for k, v in r.items() if k != "others"} for r in picked])
    assert "binding" not in vlm_eval.category_table(result)  # LLaVA files: no scene, no column


def test_prompt_suffix_goes_on_a_new_line_after_the_question():
    conversations = [{"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "red"}]
    prompt, question, reference = vlm_eval.question_prompt(conversations, "vicuna_v1", "Answer in one word.")
    assert prompt.endswith("USER: <image>\nWhat color is the square?\nAnswer in one word. ASSISTANT:")
    assert (question, reference) == ("What color is the square?", "red")


def test_cli_on_llava_json_writes_predictions_and_the_accuracy_line(checkpoint, tmp_path):
    data = export_shapes(ShapesWorld(image_size=16), tmp_path / "qa", 5, split="test")
    records = json.loads(data.read_text())
    records[1]["image"] = "images/nope.png"
    data.write_text(json.dumps(records))
    result = run_eval("--checkpoint", checkpoint, "--data", data, "--predictions", tmp_path / "p.jsonl")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"id", "question", "reference", "prediction", "correct", "category"} <= set(lines[0])
    correct = sum(line["correct"] for line in lines)
    assert result.stdout.splitlines()[-1] == f"accuracy: {correct / 4:.3f} ({correct}/4)"
    assert "category" in result.stdout and "skipped 1 of 5 records: 1 missing image" in result.stderr


def test_cli_shapes_needs_no_files(checkpoint, tmp_path):
    result = run_eval("--checkpoint", checkpoint, "--shapes", 3, "--blind", "--predictions", tmp_path / "b.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith("/3)")
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("problem", ["missing checkpoint", "bad json", "bad tokenizer"])
def test_cli_errors_are_one_line_without_traceback(checkpoint, tmp_path, problem):
    ckpt, data = checkpoint, tmp_path / "qa.json"
    data.write_text("[]")
    if problem == "missing checkpoint":
        ckpt = tmp_path / "nowhere"
    elif problem == "bad json":
        data.write_text('[{"id": 1,,}]')
    else:
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        for name in ("config.json", "model.safetensors"):
            (ckpt / name).write_bytes((checkpoint / name).read_bytes())
        (ckpt / "tokenizer.model").write_text("not a tokenizer")
    result = run_eval("--checkpoint", ckpt, "--data", data)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    expected = {"missing checkpoint": "nowhere", "bad json": "invalid JSON at line 1", "bad tokenizer": "tokenizer"}
    assert expected[problem] in result.stderr


def test_shapes_questions_come_from_the_world_the_checkpoint_was_trained_on(tmp_path):
    assert vlm_eval.checkpoint_world(tmp_path, 32, 10) == ShapesWorld(image_size=32)
    (tmp_path / "training.json").write_text(json.dumps({"shapes_world": {"image_size": 48, "jitter": 0.0}}))
    world = vlm_eval.checkpoint_world(tmp_path, 48, 1500)
    assert (world.jitter, world.image_size, world.test_size) == (0.0, 48, 1500)


@pytest.mark.parametrize("system, opening", [(None, SYSTEM + " USER: "), ("", "USER: "),
                                             ("Answer in one word.", "Answer in one word. USER: ")])
def test_training_eval_and_sample_prompt_with_the_model_own_system_prompt(checkpoint, tmp_path, monkeypatch, system,
                                                                          opening):
    """VLMConfig.system (the main job's is "": no preamble) reaches every prompt: the training sample's ids up to
    its first answer token are the ones eval.py feeds the model, and sample.py's prompt opens the same way."""
    model, tokenizer = vlm_eval.load_checkpoint(checkpoint, "cpu")
    model.cfg = dataclasses.replace(model.cfg, system=system)
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    world = ShapesWorld(image_size=16)
    trained = ShapesDataset(world, tokenizer, model.cfg, "qa", split="test", size=1)[0]
    first_answer = (trained["labels"] != IGNORE).nonzero()[0].item()
    image = model.cfg.image_token_id
    prefix = [t for k, t in enumerate(trained["input_ids"][:first_answer].tolist())
              if t != image or trained["input_ids"][k - 1] != image]  # one placeholder per image, as eval encodes
    fed, encode_prompt = [], vlm_eval.encode_prompt
    monkeypatch.setattr(vlm_eval, "encode_prompt", lambda *a: fed.append(encode_prompt(*a)) or fed[-1])
    vlm_eval.evaluate_qa(model, tokenizer, vlm_eval.shapes_records(1, world), max_new_tokens=1)
    assert fed == [prefix]
    assert tokenizer.decode([t for t in prefix if t != image]).lstrip().startswith(opening.split()[0])
    texts, encode = [], sample.encode
    monkeypatch.setattr(sample, "encode", lambda tok, m, text, *a, **kw: texts.append(text) or encode(tok, m, text,
                                                                                                        *a, **kw))
    sample.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "What color is the circle?",
                 "--max-new-tokens", "1"])
    sample.Chat(VLM.from_pretrained(tmp_path / "ckpt"), tokenizer, [], max_new_tokens=1).ask("Is there a cross?")
    assert [t[:len(opening)] for t in texts] == [opening, opening]
