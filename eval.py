"""Score a VLM on short-answer questions: greedy, batched decoding and exact match after normalisation.

Follows LLaVA's VQA-style evaluation (Liu et al. 2024): the last `gpt` turn of each record is the reference,
answers are normalised (lowercase, no punctuation or articles, number words as digits) and compared exactly.
`--blind` replaces every image with zeros: the gap to the normal score shows how much the model looks.
train.py's main job imports `evaluate_qa`, so its final two lines come from this exact code path.
"""

import argparse
import json
import string
import sys
from pathlib import Path

import torch

from data import (
    DataError,
    ShapesWorld,
    clean_record,
    expand_images,
    images_to_pixels,
    load_image,
    media_tokens,
    preprocess_video,
    read_records,
    skip_report,
)
from model import VLM
from tokenizer import IMAGE, TEMPLATES, Tokenizer, build_prompt, check_template, encode_prompt, load_tokenizer

ARTICLES = {"a", "an", "the"}
NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
BINDING = ("color", "shape", "position")  # ShapesWorld question types that ask about one object of several


def normalize(answer: str) -> str:
    """"The Two." -> "2": lowercase, punctuation to spaces, articles dropped, number words as digits."""
    words = answer.lower().translate(PUNCTUATION).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ARTICLES)


# ----------------------------------------------------------------------------- records


def checkpoint_world(ckpt_dir, image_size: int, n: int) -> ShapesWorld:
    """The ShapesWorld a checkpoint was trained on (train.py records it in training.json), at the model's size."""
    training = Path(ckpt_dir) / "training.json"
    settings = json.loads(training.read_text()).get("shapes_world", {}) if training.is_file() else {}
    return ShapesWorld(**({"image_size": image_size} | settings | {"test_size": max(n, ShapesWorld.test_size)}))


def shapes_records(n: int, world: ShapesWorld) -> list[dict]:
    """n held-out ShapesWorld questions as eval records: {"id", "images", "conversations", "category", "others"}.

    "others" are the answers the same question would have about the scene's other objects ("What color is the
    circle?" -> the colours of the non-circles). A wrong answer among them is a binding error: the model saw the
    attribute but took it from the wrong object. A wrong answer outside them is a perception error.
    """
    if n > world.test_size:
        raise ValueError(f"--shapes {n} is more than the {world.test_size} scenes of the held-out split")
    records = []
    for i in range(n):
        record = world.record(i, "qa", "test")
        answer, field = record["conversations"][-1]["value"], record["category"]
        scene = world.scene(i, "test") if field in BINDING else []
        others = sorted({getattr(o, field) for o in scene} - {answer})
        images, videos = ([record.pop("image")], []) if "image" in record else ([], [record.pop("video")])
        records.append(record | {"images": images, "videos": videos, "others": others})
    return records


def shapes_scores(ckpt_dir, n: int) -> tuple[dict, dict]:
    """(normal, blind) results on n held-out ShapesWorld questions, with each image, then with zeros instead:
    the test of the main job and of experiments.py. A model that looks at the image loses accuracy blind."""
    model, tokenizer = VLM.from_pretrained(ckpt_dir), load_tokenizer(ckpt_dir)
    records = shapes_records(n, checkpoint_world(ckpt_dir, model.cfg.vision.image_size, n))
    return evaluate_qa(model, tokenizer, records), evaluate_qa(model, tokenizer, records, blind=True)


def file_records(path, image_folder) -> tuple[list[dict], dict[int, str], int]:
    """LLaVA-format records with their images loaded; bad ones are skipped. -> (records, skipped, total)"""
    raw = read_records(path)
    folder = Path(image_folder) if image_folder is not None else Path(path).parent
    records, skipped = [], {}
    for index, record in enumerate(raw):
        clean = clean_record(record, index)
        if isinstance(clean, str):
            skipped[index] = clean
            continue
        if clean["videos"]:
            skipped[index] = "video record (eval.py scores images only)"
            continue
        try:
            images = [load_image(folder / p) for p in clean["images"]]
        except FileNotFoundError:
            skipped[index] = "missing image"
            continue
        except DataError:
            skipped[index] = "unreadable image"
            continue
        category = record.get("category", "all")
        records.append(clean | {"images": images, "category": str(category)})
    return records, skipped, len(raw)


def question_prompt(conversations: list[dict], template: str, suffix: str | None,
                    tokenizer: Tokenizer | None = None, system: str | None = None) -> tuple[str, str, str]:
    """-> (prompt ready for the answer, the question, the reference answer): the last gpt turn is the answer.
    system: the model's own system prompt (VLMConfig.system)."""
    *context, reference = conversations
    question = context[-1]["value"]
    if suffix:
        context = context[:-1] + [{"from": context[-1]["from"], "value": f"{question}\n{suffix}"}]
    return (build_prompt(context, template, tokenizer, system), question.replace(IMAGE, "").strip(),
            reference["value"])


# ----------------------------------------------------------------------------- scoring


@torch.inference_mode()
def evaluate_qa(model: VLM, tokenizer: Tokenizer, records: list[dict], batch_size=64, blind=False,
                prompt_suffix=None, max_new_tokens=16, template=None, static=False) -> dict:
    """Greedy answers for every record, batched with left padding. -> {"accuracy", "correct", "total",
    "by_category": {name: (correct, total)}, "predictions": [one dict per record]}

    static: decode over one full-context KV cache per batch size, reused by every batch, so a compiled decode
    step (model.compile_decode_step) sees fixed shapes and compiles at most twice (full and last batch)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions, states = [], {}
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        template = template or cfg.template
        prompts = [question_prompt(r["conversations"], template, prompt_suffix, tokenizer, cfg.system) for r in batch]
        ids = []
        for record, (prompt, _, _) in zip(batch, prompts, strict=True):  # each tag grows to its own count
            one_each = encode_prompt(tokenizer, prompt, template, cfg.image_token_id, 1)
            counts, fills = media_tokens(cfg, record.get("media"), record["images"], record.get("videos", []))
            ids.append(expand_images(one_each, one_each, counts, cfg.image_token_id, fills)[0])  # ids as labels
        T = max(map(len, ids))
        input_ids = torch.full((len(ids), T), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.bool)
        for row, seq in enumerate(ids):  # left padding: every prompt ends where generation starts
            input_ids[row, T - len(seq):] = torch.tensor(seq)
            attention_mask[row, T - len(seq):] = True
        images = [im for r in batch for im in r["images"]]
        pixel_values = [images_to_pixels(r["images"], cfg, cfg.image_mode, cfg.tiles(len(r["images"]))) for r in batch]
        pixel_values = torch.cat([p for p in pixel_values if p is not None]) if images else None  # (views, 3, S, S)
        sizes = torch.tensor([(im.height, im.width) for im in images]) if images else None  # (N, 2)
        tiled = torch.tensor([cfg.tiles(len(r["images"])) for r in batch for _ in r["images"]]) if images else None
        clips = [preprocess_video(clip, cfg.vision) for r in batch for clip in r.get("videos", [])]  # lists of frames
        videos = torch.stack(clips) if clips else None  # (V, F, 3, S, S)
        if blind and pixel_values is not None:
            pixel_values = torch.zeros_like(pixel_values)
        if blind and videos is not None:
            videos = torch.zeros_like(videos)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        state = None
        if static:
            state = states[len(batch)] = states.get(len(batch)) or model.new_state(len(batch))
            state.reset()
        new_tokens = model.generate(input_ids.to(device), pixel_values, max_new_tokens=max_new_tokens,
                                    eos_id=tokenizer.stop_ids, attention_mask=attention_mask.to(device), state=state,
                                    image_sizes=sizes, image_tiled=tiled,
                                    videos=videos.to(device) if videos is not None else None)
        for record, (_, question, reference), tokens in zip(batch, prompts, new_tokens.tolist(), strict=True):
            answer = tokenizer.decode(tokenizer.until_stop(tokens)).strip()
            prediction = {"id": record["id"], "category": record.get("category", "all"), "question": question,
                          "reference": reference, "prediction": answer,
                          "correct": normalize(answer) == normalize(reference)}
            if "others" in record:  # ShapesWorld: did a wrong answer describe another object?
                prediction["binding_error"] = normalize(answer) in {normalize(o) for o in record["others"]}
            predictions.append(prediction)
    model.train(was_training)
    by_category = {}
    for p in predictions:
        correct, total = by_category.get(p["category"], (0, 0))
        by_category[p["category"]] = (correct + p["correct"], total + 1)
    correct = sum(p["correct"] for p in predictions)
    return {"accuracy": correct / max(len(predictions), 1), "correct": correct, "total": len(predictions),
            "by_category": dict(sorted(by_category.items())), "predictions": predictions}


def category_table(result: dict) -> str:
    """A small aligned table: category, accuracy, correct/total; on ShapesWorld also how many of the wrong
    answers are binding errors (another object's colour, shape or position), where the category has them."""
    binding = any("binding_error" in p for p in result["predictions"])
    rows = []
    for name, (c, t) in result["by_category"].items():
        row = [name, f"{c / t:.3f}", f"{c}/{t}"]
        if binding:
            wrong = [p for p in result["predictions"] if p["category"] == name and not p["correct"]]
            row.append(f"{sum(p['binding_error'] for p in wrong)}/{len(wrong)}" if name in BINDING else "-")
        rows.append(row)
    header = ["category", "accuracy", "correct"] + ["binding errors/wrong"] * binding
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]
    lines = []
    for row in [header] + rows:  # names to the left, numbers to the right
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def accuracy_line(result: dict, label="accuracy") -> str:
    return f"{label}: {result['accuracy']:.3f} ({result['correct']}/{result['total']})"


def write_predictions(result: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p) + "\n")


# ----------------------------------------------------------------------------- CLI


def load_checkpoint(ckpt_dir, device) -> tuple[VLM, Tokenizer]:
    """The model and its tokenizer, or SystemExit with one line naming the file."""
    try:
        model = VLM.from_pretrained(ckpt_dir, device=device)
        tokenizer = load_tokenizer(ckpt_dir)
        tokenizer.check_fits(model.cfg.lm.vocab_size)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    return model.eval(), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="out/finetune", help="checkpoint dir (config.json, "
                        "model.safetensors, tokenizer.json or tokenizer.model)")
    parser.add_argument("--data", help="LLaVA-format QA records (.json or .jsonl); the last gpt turn is the answer")
    parser.add_argument("--image-folder", help="image paths in --data are relative to this (default: its folder)")
    parser.add_argument("--shapes", type=int, metavar="N", help="instead of --data: N held-out ShapesWorld questions")
    parser.add_argument("--blind", action="store_true", help="replace every image with zeros (the ablation)")
    parser.add_argument("--prompt-suffix", help='appended to the question on a new line, e.g. "Answer the '
                        'question using a single word or phrase."')
    parser.add_argument("--template", choices=TEMPLATES,
                        help="chat template (default: the one the checkpoint was finetuned with)")
    parser.add_argument("--batch-size", type=int, default=64, help="questions decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated")
    parser.add_argument("--predictions", help="where to write predictions.jsonl (default: inside --checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    parser.add_argument("--compile", action="store_true", help="compile the one-token decode step over a static "
                        "KV cache (inductor on CPU, CUDA graphs on CUDA); the same answers as without")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="int8 or int4 weight-only LM layers made at load time (quantize.py); answers may differ "
                        "slightly")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.shapes is None):
        parser.error("give exactly one of --data FILE or --shapes N")

    model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    try:
        check_template(tokenizer, args.template or model.cfg.template)
        model.prepare_decoding(args.quantize, args.compile)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        if args.shapes is not None:
            world = checkpoint_world(args.checkpoint, model.cfg.vision.image_size, args.shapes)
            records, skipped, total = shapes_records(args.shapes, world), {}, args.shapes
        else:
            records, skipped, total = file_records(args.data, args.image_folder)
    except (DataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if skipped:
        print(skip_report(skipped, total), file=sys.stderr)
    result = evaluate_qa(model, tokenizer, records, args.batch_size, args.blind, args.prompt_suffix,
                         args.max_new_tokens, args.template, static=args.compile)
    path = args.predictions or Path(args.checkpoint) / ("predictions_blind.jsonl" if args.blind
                                                        else "predictions.jsonl")
    write_predictions(result, path)
    print(category_table(result))
    print(f"predictions written to {path}")
    print(accuracy_line(result))


if __name__ == "__main__":
    main()
