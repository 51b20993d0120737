"""data.py: image preprocessing (against transformers' CLIP processor), LLaVA records and their skip report,
collate, world-size independent sampling, and ShapesWorld's determinism and correctness."""

import json
import re
from collections import Counter
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch.utils.data import DataLoader

from data import (
    PALETTE,
    POSITIONS,
    DataError,
    GlobalBatchSampler,
    LlavaDataset,
    ShapesDataset,
    ShapesWorld,
    Skipped,
    collate,
    load_image,
    main,
    preprocess,
)
from tokenizer import IGNORE, build_prompt, encode_conversation, train_tokenizer
from vit import ViTConfig, siglip_config

# transformers >= 5 names the PIL implementation CLIPImageProcessorPil; before, CLIPImageProcessor was it
CLIPProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
VISION = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(ShapesWorld().texts(200), 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def cfg(tok):
    return SimpleNamespace(image_token_id=tok.vocab_size, num_image_tokens=4, vision=VISION, grid_pinpoints=[],
                           system=None, image_tokens=lambda size=None, tiled=True: 4, tiles=lambda num_images: False)


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def solid(color, size=(24, 16)):
    return Image.new("RGB", size, color)


# ----------------------------------------------------------------------------- images


def clip_processor(vision):
    return CLIPProcessor(size={"shortest_edge": vision.image_size},
                         crop_size={"height": vision.image_size, "width": vision.image_size},
                         image_mean=list(vision.image_mean), image_std=list(vision.image_std))


@pytest.mark.parametrize("vision", [VISION, siglip_config(image_size=32, patch_size=8, width=32, depth=1, heads=2,
                                                          mlp_dim=64)])
@pytest.mark.parametrize("size", [(57, 40), (40, 57), (100, 33), (32, 32)])  # odd crop offsets, landscape, portrait
def test_crop_matches_clip_image_processor(vision, size):
    image = random_image(*size)
    want = clip_processor(vision)(image, return_tensors="pt")["pixel_values"][0]
    got = preprocess(image, vision, "crop")
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pad_is_llava_expand2square_then_clip():
    def expand2square(pil_img, background_color):  # llava/mm_utils.py
        width, height = pil_img.size
        if width == height:
            return pil_img
        elif width > height:
            result = Image.new(pil_img.mode, (width, width), background_color)
            result.paste(pil_img, (0, (width - height) // 2))
            return result
        else:
            result = Image.new(pil_img.mode, (height, height), background_color)
            result.paste(pil_img, ((height - width) // 2, 0))
            return result

    for size in [(57, 40), (40, 57)]:
        image = random_image(*size)
        padded = expand2square(image, tuple(int(x * 255) for x in VISION.image_mean))
        want = clip_processor(VISION)(padded, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess(image, VISION, "pad"), want, atol=1e-5, rtol=0)
    border = preprocess(random_image(64, 32), VISION, "pad")[:, 0, 0]  # a padded corner: the mean colour
    mean, std = torch.tensor(VISION.image_mean), torch.tensor(VISION.image_std)
    torch.testing.assert_close(border, ((mean * 255).int() / 255 - mean) / std, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown image mode 'squash'"):
        preprocess(image, VISION, "squash")


def test_load_image_applies_exif_orientation_and_converts_to_rgb(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, rotate 90 degrees clockwise to view
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "photo.jpg")
    assert upright.size == (10, 20) and upright.mode == "RGB"
    top, bottom = upright.getpixel((5, 2)), upright.getpixel((5, 17))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red went to the top
    for mode in ["L", "RGBA", "P", "I;16"]:
        Image.new(mode, (8, 8)).save(tmp_path / f"{mode[0]}.png")
        assert load_image(tmp_path / f"{mode[0]}.png").mode == "RGB"


def test_unreadable_images_raise_errors_naming_the_file(tmp_path, monkeypatch):
    random_image(40, 40).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    for name in ["truncated.png", "empty.png", "text.png"]:
        with pytest.raises(DataError, match=f"{name}: not a readable image"):
            load_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nothere.png: no such image"):
        load_image(tmp_path / "nothere.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the guard is PIL's; 40x40 > 2 x 100 is a "bomb"
    with pytest.raises(DataError, match="full.png: not a readable image .*decompression bomb"):
        load_image(tmp_path / "full.png")


# ----------------------------------------------------------------------------- LLaVA records


def human_gpt(*values, roles=("human", "gpt")):
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture
def llava_dir(tmp_path):
    solid((255, 0, 0)).save(tmp_path / "red.png")
    solid((0, 0, 255), (16, 24)).save(tmp_path / "blue.png")
    random_image(40, 40).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = [
        {"id": "tag-after", "image": "red.png", "conversations": human_gpt("What color is it?\n<image>", "red")},
        {"id": "two-images", "image": ["red.png", "blue.png"],
         "conversations": human_gpt("First <image> then <image>: same?", "no")},
        {"id": "text-only", "conversations": human_gpt("How many sides has a square?", "4")},
        {"id": "user-assistant", "image": "blue.png", "conversations": human_gpt(
            "<image>\nColor?", "blue", "Shape?", "a rectangle", roles=("user", "assistant"))},
        {"id": "image-list", "image": ["red.png"], "conversations": human_gpt("<image>\nColor?", "red")},
    ]
    bad = [
        ({"id": "b1", "image": "gone.png", "conversations": human_gpt("<image>\nColor?", "red")}, "missing image"),
        ({"id": "b2", "image": "truncated.png", "conversations": human_gpt("<image>\nX?", "y")}, "unreadable image"),
        ({"id": "b3", "image": "empty.png", "conversations": human_gpt("<image>\nX?", "y")}, "unreadable image"),
        ({"id": "b4", "image": "text.png", "conversations": human_gpt("<image>\nX?", "y")}, "unreadable image"),
        ({"id": "b5", "image": "red.png"}, "empty conversation"),
        ({"id": "b6", "conversations": []}, "empty conversation"),
        ({"id": "b7", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "turn without value"),
        ({"id": "b8", "conversations": human_gpt("hi", "hello", roles=("gpt", "human"))}, "wrong role order"),
        ({"id": "b9", "conversations": human_gpt("question without answer")}, "wrong role order"),
        ({"id": "b10", "image": ["red.png", "blue.png"], "conversations": human_gpt("<image>\nX?", "y")},
         "image/tag count mismatch"),
        ({"id": "b11", "conversations": human_gpt("red " * 200, "yes")}, "too long"),
        ({"id": "b12", "conversations": human_gpt("hi", "hi", roles=("human", "system"))}, "unknown role"),
        ("not a record", "malformed record"),
    ]
    records = good[:2] + [r for r, _ in bad[:7]] + good[2:] + [r for r, _ in bad[7:]]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return SimpleNamespace(path=tmp_path, good=good, reasons=Counter(reason for _, reason in bad), n=len(records))


def reasons_of(report):
    head, _, tail = report.partition(": ")
    return head, Counter({m[3]: int(m[2]) for m in re.finditer(r"(^|, )(\d+) ([^,]+)", tail)})


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_llava_dataset_encodes_good_records_and_skips_each_bad_reason(llava_dir, tok, cfg, name):
    dataset = LlavaDataset(llava_dir.path / name, llava_dir.path, tok, cfg, max_len=128)
    assert len(dataset) == llava_dir.n - 8  # the text problems are found up front
    samples = [dataset[i] for i in range(len(dataset))]
    good = {s["id"]: s for s in samples if not isinstance(s, Skipped)}
    assert list(good) == [r["id"] for r in llava_dir.good]
    head, reasons = reasons_of(dataset.skip_report())
    assert head == f"skipped 13 of {llava_dir.n} records" and reasons == llava_dir.reasons

    moved = encode_conversation(tok, human_gpt("<image>\nWhat color is it?", "red"), "vicuna_v1",
                                cfg.image_token_id, 4)  # LLaVA moves a lone tag to the front
    assert good["tag-after"]["input_ids"].tolist() == moved[0] and good["tag-after"]["labels"].tolist() == moved[1]
    red, blue = preprocess(solid((255, 0, 0)), VISION), preprocess(solid((0, 0, 255), (16, 24)), VISION)
    torch.testing.assert_close(good["two-images"]["pixel_values"], torch.stack([red, blue]))
    assert good["two-images"]["input_ids"].tolist().count(cfg.image_token_id) == 8
    assert good["text-only"]["pixel_values"] is None
    assert cfg.image_token_id not in good["text-only"]["input_ids"].tolist()
    answers = good["user-assistant"]["labels"][good["user-assistant"]["labels"] != IGNORE].tolist()
    assert tok.decode(answers) == "blue a rectangle"  # both answers; eos decodes to nothing
    assert answers.count(tok.eos_id) == 2
    texts = dataset.texts()  # tokenizer-training text for a from-scratch model
    assert len(texts) == len(dataset) and "What color is it? ASSISTANT: red" in texts[0]
    assert not any("<image>" in text or "</s>" in text for text in texts)


def test_skips_found_in_dataloader_workers_reach_the_report(llava_dir, tok, cfg):
    reports = []
    for workers in [0, 2]:
        dataset = LlavaDataset(llava_dir.path / "data.json", llava_dir.path, tok, cfg, max_len=128)
        loader = DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=partial(collate, pad_id=tok.pad_id))
        for batch in loader:
            dataset.skipped.update(batch["skipped"])
        for batch in loader:  # a second epoch must not count the same records again
            dataset.skipped.update(batch["skipped"])
        reports.append(dataset.skip_report())
    assert reports[0] == reports[1] and reasons_of(reports[1])[1] == llava_dir.reasons


def test_invalid_json_names_file_line_and_column(tmp_path, tok, cfg):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": "abcd" "image": 1}\n]\n')  # the missing comma is at column 17
    with pytest.raises(DataError) as err:
        LlavaDataset(path, tmp_path, tok, cfg)
    assert str(err.value) == f"{path}: invalid JSON at line 3 column 17"
    path = tmp_path / "data.jsonl"  # in JSON Lines a bad line is one bad record: skipped, its line named
    path.write_text('{"id": "a"}\n\n{"id": "b",}\n' + json.dumps({"conversations": human_gpt("hi", "yo")}) + "\n")
    dataset = LlavaDataset(path, tmp_path, tok, cfg)
    assert len(dataset) == 1
    assert dataset.skip_report() == "skipped 2 of 3 records: 1 empty conversation, 1 malformed line (line 3)"
    path = tmp_path / "object.json"
    path.write_text('{"id": "a"}')
    with pytest.raises(DataError, match="object.json: expected a JSON list of records, found a dict"):
        LlavaDataset(path, tmp_path, tok, cfg)
    with pytest.raises(DataError, match="nothere.json: no such file"):
        LlavaDataset(tmp_path / "nothere.json", tmp_path, tok, cfg)
    path.write_text(json.dumps([{"image": "a.png", "conversations": human_gpt("<image>", "x")}]))
    with pytest.raises(DataError, match="imgs: no such image folder"):
        LlavaDataset(path, tmp_path / "imgs", tok, cfg)


# ----------------------------------------------------------------------------- batches


def test_collate_pads_masks_and_drops_skipped_samples():
    pixels = [torch.full((n, 3, 4, 4), float(k)) for k, n in enumerate([1, 2])]
    samples = [
        {"id": "a", "input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([IGNORE, IGNORE, 6]),
         "pixel_values": pixels[0]},
        Skipped(7, "missing image"),
        {"id": "b", "input_ids": torch.tensor([1, 8]), "labels": torch.tensor([IGNORE, 8]), "pixel_values": None},
        {"id": "c", "input_ids": torch.tensor([1, 9, 9, 9, 2]), "labels": torch.tensor([IGNORE, 9, 9, 9, 2]),
         "pixel_values": pixels[1]},
    ]
    batch = collate(samples, pad_id=0)
    assert batch["ids"] == ["a", "b", "c"] and batch["skipped"] == {7: "missing image"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 8, 0, 0, 0], [1, 9, 9, 9, 2]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 6, IGNORE, IGNORE], [IGNORE, 8] + [IGNORE] * 3,
                                        [IGNORE, 9, 9, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))  # placeholder order: a's image, then c's two
    assert batch["num_tokens"] == 6
    assert collate(samples[1:3], pad_id=0)["pixel_values"] is None


def global_batches(world_size, micro, **kw):
    """Every optimizer step's samples, gathered over ranks in rank order."""
    per_rank = [list(GlobalBatchSampler(100, 8, seed=3, rank=r, world_size=world_size, micro_batch_size=micro,
                                        **kw)) for r in range(world_size)]
    accum = 8 // world_size // micro
    steps = len(per_rank[0]) // accum
    return [sum((sum(rank[s * accum : (s + 1) * accum], []) for rank in per_rank), []) for s in range(steps)]


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    reference = global_batches(1, 8)  # 1 process x batch 8
    assert len(reference) == 12 and all(len(b) == 8 for b in reference)  # 100 // 8; the last 4 are dropped
    assert global_batches(1, 4) == reference  # batch 4 x accumulation 2
    assert global_batches(2, 4) == reference  # 2 processes x batch 4
    assert global_batches(4, 1) == reference  # 4 processes x batch 1 x accumulation 2
    flat = sum(reference, [])
    assert len(set(flat)) == 96 and set(flat) <= set(range(100))  # an epoch is a permutation
    assert global_batches(1, 8, epoch=1) != reference and global_batches(1, 8) == reference
    assert global_batches(2, 4, start_step=5) == reference[5:]  # exact resume
    assert sum(global_batches(2, 2, shuffle=False), []) == list(range(96))  # a stream: index = position
    assert len(GlobalBatchSampler(100, 8, world_size=2, micro_batch_size=2, start_step=5)) == 7 * 2
    with pytest.raises(ValueError, match="global batch 8 does not split into 3 ranks"):
        GlobalBatchSampler(100, 8, world_size=3)


# ----------------------------------------------------------------------------- ShapesWorld


def test_shapes_world_is_deterministic_by_seed_split_and_index():
    a, b = ShapesWorld(), ShapesWorld()
    for i in range(20):
        ra, rb = a.record(i), b.record(i)
        assert ra["image"].tobytes() == rb["image"].tobytes() and ra["conversations"] == rb["conversations"]
    images = {a.record(i)["image"].tobytes() for i in range(20)}
    assert len(images) == 20
    assert images.isdisjoint(a.record(i, split="test")["image"].tobytes() for i in range(20))
    assert images.isdisjoint(ShapesWorld(seed=1).record(i)["image"].tobytes() for i in range(20))
    assert a.record(5, "caption")["image"].tobytes() == a.record(5, "qa")["image"].tobytes()
    with pytest.raises(IndexError, match="test scene 1000 is outside the test split"):
        a.record(1000, split="test")


def test_shapes_world_multi_turn_questions_and_finite_train_split():
    single, multi = ShapesWorld(), ShapesWorld(questions=3)
    for i in range(50):
        turns = multi.record(i)["conversations"]
        objects = multi.scene(i)
        questions = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in q for q in questions[1:])
        assert len(set(questions)) == len(questions) <= 3 and (len(objects) == 1 or len(questions) == 3)
        assert all(a["value"] == answer_from_scene(q, objects, multi.grid)
                   for q, a in zip(questions, turns[1::2], strict=True))
        assert turns[:2] == single.record(i)["conversations"]  # the first turn is the single-question record
        assert multi.record(i, split="test")["conversations"] == single.record(i, split="test")["conversations"]
    finite = ShapesWorld(train_size=7)
    assert finite.record(9)["image"].tobytes() == finite.record(2)["image"].tobytes()
    assert finite.record(9)["conversations"] == finite.record(2)["conversations"]
    assert finite.record(9, split="test")["image"].tobytes() == single.record(9, split="test")["image"].tobytes()
    with pytest.raises(ValueError, match="questions must be at least 1"):
        ShapesWorld(questions=0)


def answer_from_scene(question, objects, grid):
    """Re-derive a question's answer from the scene description alone."""
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (o,) = [o for o in objects if o.shape == m[1]]
        return o.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (o,) = [o for o in objects if o.color == m[1]]
        return o.shape
    if question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (o,) = [o for o in objects if (o.color, o.shape) == (m[1], m[2])]
        return o.position
    m = re.fullmatch(r"Is there a (\w+) (\w+)\?", question)
    return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objects) else "no"


@pytest.mark.parametrize("world", [ShapesWorld(), ShapesWorld(image_size=32, grid=2, shapes=("star", "diamond",
                                                                                          "circle", "cross"))])
def test_shapes_world_answers_and_pictures_agree_with_the_scene(world):
    categories, yes = Counter(), Counter()
    for i in range(400):
        objects = world.scene(i)
        assert 1 <= len(objects) <= 4 and len({(o.color, o.shape) for o in objects}) == len(objects)
        conversations, category, _ = world.conversation(objects, i)
        question = conversations[0]["value"].removeprefix("<image>\n")
        answer = conversations[1]["value"]
        assert answer == answer_from_scene(question, objects, world.grid), (i, question)
        categories[category] += 1
        yes[answer] += category == "exists"
        caption = world.caption(objects)
        assert all(f"{o.size} {o.color} {o.shape}" in caption for o in objects)
        if i < 100:
            pixels = np.asarray(world.render(objects, i))
            cell = world.image_size / world.grid
            for o in objects:
                assert tuple(pixels[int(o.y), int(o.x)]) == PALETTE[o.color], (i, o)  # drawn where described
                assert POSITIONS[world.grid][int(o.y // cell) * world.grid + int(o.x // cell)] == o.position
    assert set(categories) == {"color", "shape", "count", "position", "exists"}
    assert min(categories.values()) > 0.12 * 400
    assert 0.4 < yes["yes"] / categories["exists"] < 0.6


def asked_object(question: str, objects: list):
    """The object a ShapesWorld question is about, read from its words: None for a count or an absent object."""
    words = question.rstrip("?").split()
    if question.startswith("How many"):
        return None
    if question.startswith("What color"):
        return next(o for o in objects if o.shape == words[-1])
    if question.startswith("What shape"):
        return next(o for o in objects if o.color == words[-2])
    return next((o for o in objects if (o.color, o.shape) == (words[-2], words[-1])), None)


@pytest.mark.parametrize("patch", [16, 8])
def test_grounding_points_each_answer_at_the_image_tokens_of_its_object_and_the_words_naming_it(tok, patch):
    """From the position that predicts each answer's first token to the tokens of the patches in the asked
    object's cell (the first token when no object fits), and to the tokens that spell the question's colour and
    shape words; none for a count. Packing keeps each pair on its tokens."""
    vision = ViTConfig(image_size=48, patch_size=patch, width=32, depth=1, heads=2, mlp_dim=64)
    G = vision.grid
    cfg = SimpleNamespace(image_token_id=tok.vocab_size, vision=vision, grid_pinpoints=[], system=None,
                          image_tokens=lambda size=None, tiled=True: G * G, tiles=lambda num_images: False)
    world = ShapesWorld(image_size=48, questions=3)
    data = ShapesDataset(world, tok, cfg, task="qa", ground=True, ground_words=True)
    kinds, samples = Counter(), [data[i] for i in range(40)]
    for i, sample in enumerate(samples):
        objects, turns = world.scene(i), world.record(i)["conversations"]
        labels, image = sample["labels"], sample["input_ids"].tolist().index(tok.vocab_size)
        keys, words = {}, {}  # query -> image keys, query -> word keys
        for q, k, kind in sample["ground"].tolist():
            (words if kind else keys).setdefault(q, []).append(k)
        asked = [(asked_object(t["value"].removeprefix("<image>\n"), objects), a["value"], t["value"])
                 for t, a in zip(turns[0::2], turns[1::2], strict=True)]
        grounded = [(o, answer, q) for o, answer, q in asked if not answer.isdigit()]  # a count has no one object
        assert len(keys) == len(grounded) and set(words) == set(keys)
        for (q, ks), (o, answer, question) in zip(sorted(keys.items()), grounded, strict=True):
            named = [w for w in question.rstrip("?").split() if w in world.colors + world.shapes]
            assert named and tok.decode(sample["input_ids"][words[q]].tolist()).split() == named
            end = next((t for t in range(q + 1, len(labels)) if labels[t] == IGNORE), len(labels))
            assert labels[q] == IGNORE and tok.decode(labels[q + 1 : end]).strip() == answer  # q predicts it
            if o is None:  # "Is there a ...?" "no": the first token, a sink
                assert ks == [0] and answer == "no"
                kinds["absent"] += 1
                continue
            cells = {int((k - image) // G * 48 / G // 16) * 3 + int((k - image) % G * 48 / G // 16) for k in ks}
            assert cells == {POSITIONS[3].index(o.position)} and len(ks) == (G // 3) ** 2
            kinds["object"] += 1
    assert kinds["absent"] > 5 and kinds["object"] > 50
    plain = ShapesDataset(world, tok, cfg, task="qa", ground=True)  # the words are opt-in (train.py --ground-words)
    assert all(torch.equal(plain[i]["ground"], s["ground"][s["ground"][:, 2] == 0]) for i, s in enumerate(samples))
    for pack_len in (None, 256):
        batch = collate(samples, tok.pad_id, pack_len)
        rows, queries, keys, kind = batch["ground"].unbind(1)
        assert (batch["labels"][rows, queries] == IGNORE).all() and (batch["labels"][rows, queries + 1] != IGNORE).all()
        words = [s["input_ids"][s["ground"][s["ground"][:, 2] == 1, 1]].tolist() for s in samples]
        assert sorted(batch["input_ids"][rows[kind == 1], keys[kind == 1]].tolist()) == sorted(sum(words, []))
        assert (keys[kind == 1] < queries[kind == 1]).all()
        rows, queries, keys = rows[kind == 0], queries[kind == 0], keys[kind == 0]
        on_image = batch["input_ids"][rows, keys] == tok.vocab_size
        starts = keys == 0  # a sample's first token: a row's, or where a packed segment begins
        if pack_len:
            segments = batch["segment_ids"]
            starts |= segments[rows, keys] != segments[rows, (keys - 1).clamp(min=0)]
        assert (on_image | starts).all() and (~on_image).sum() == kinds["absent"]
        assert batch["num_grounds"] == kinds["absent"] + kinds["object"]
    coarse = SimpleNamespace(**vars(cfg) | {"vision": ViTConfig(image_size=48, patch_size=24, width=32, depth=1,
                                                                heads=2, mlp_dim=64), "image_tokens": lambda *a: 4})
    with pytest.raises(ValueError, match=r"no patch of the tower's 2x2 grid has its centre in the box \(0.33"):
        for i in range(40):  # 2x2 patches cannot ground the middle column of a 3x3 world
            ShapesDataset(world, tok, coarse, task="qa", ground=True)[i]


def test_shapes_world_defaults_and_validation():
    world = ShapesWorld()
    assert len(world.colors) >= 6 and len(world.shapes) >= 4 and 32 <= world.image_size <= 64
    assert world.record(0)["image"].size == (world.image_size, world.image_size)
    with pytest.raises(ValueError, match="need count, position or exists too"):
        ShapesWorld(categories=("shape",))
    with pytest.raises(ValueError, match=r"unknown colour \['mauve'\]"):
        ShapesWorld(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="max_objects 5 does not fit a 2x2 grid"):
        ShapesWorld(grid=2, max_objects=5)


def test_shapes_dataset_yields_llava_samples(tok, cfg):
    world = ShapesWorld(image_size=32)
    record = world.record(3, "caption")
    sample = ShapesDataset(world, tok, cfg, task="caption")[3]
    caption = world.caption(world.scene(3))
    assert tok.decode(sample["labels"][sample["labels"] != IGNORE]) == caption + "\n"  # plain template
    torch.testing.assert_close(sample["pixel_values"], preprocess(record["image"], VISION)[None])
    qa = ShapesDataset(world, tok, cfg, task="qa", split="test")
    assert len(qa) == world.test_size
    conversations, _, _ = world.conversation(world.scene(3, "test"), 3, split="test")
    assert tok.decode(qa[3]["labels"][qa[3]["labels"] != IGNORE]) == conversations[1]["value"]
    assert build_prompt(conversations[:1]).endswith("ASSISTANT:")
    words = " ".join(world.texts(50))
    assert "ASSISTANT:" in words and caption.split(" at ")[0] in " ".join(world.texts(4))


def test_exported_shapes_load_back_as_the_same_samples(tmp_path, tok, cfg, capsys):
    main(["--export-shapes", str(tmp_path), "--n", "6", "--image-size", "32"])
    assert "wrote 6 qa records" in capsys.readouterr().out
    records = json.loads((tmp_path / "qa_train.json").read_text())
    assert records[0]["image"] == "images/train_000000.png" and records[0]["category"]
    dataset = LlavaDataset(tmp_path / "qa_train.json", tmp_path, tok, cfg)
    shapes = ShapesDataset(ShapesWorld(image_size=32), tok, cfg, task="qa")
    for i in range(6):
        for key in ["input_ids", "labels", "pixel_values"]:
            assert torch.equal(dataset[i][key], shapes[i][key])
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--export-shapes DIR" in capsys.readouterr().out
