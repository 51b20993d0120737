"""Data: images and conversations to the tensors `VLM` consumes, and ShapesWorld, the built-in dataset.

Reads LLaVA's format (Liu et al. 2023): a JSON list, or JSONL, of {"id", "image", "conversations"} records,
with image paths relative to an image folder. Images get LLaVA-1.5's pad-to-square or CLIP's resize-and-crop.
ShapesWorld draws coloured shapes procedurally, so the project trains offline with nothing downloaded.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import Dataset

import anyres
from tokenizer import IGNORE, IMAGE, ROLES, TEMPLATES, TooLong, corpus_text, encode_conversation
from video import VideoError, read_video

VIDEO = "<video>"  # a video's tag in a record that mixes images and videos; tokenized as one <image> placeholder


class DataError(ValueError):
    """A problem with the user's data, worth one line: the CLIs print it instead of a traceback."""


# ----------------------------------------------------------------------------- images


def load_image(path) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation. PIL's decompression-bomb guard stays on."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # phones store rotation in EXIF
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, empty, not an image
        raise DataError(f"{path}: not a readable image ({err})") from None


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: pad the short side evenly with `fill`, so a later crop removes nothing."""
    w, h = image.size
    if w == h:
        return image
    square = Image.new("RGB", (max(w, h), max(w, h)), fill)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def preprocess(image: Image.Image, vision_cfg, mode="pad") -> torch.Tensor:
    """PIL image -> (3, S, S) normalised pixels, S = vision_cfg.image_size.

    "crop" is CLIPImageProcessor: bicubic resize of the short side to S, centre crop, rescale, normalise.
    "pad" is LLaVA-1.5's: pad to a square with the mean colour first, so the whole image is kept.
    """
    if mode == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in vision_cfg.image_mean))
    elif mode != "crop":
        raise ValueError(f"unknown image mode {mode!r}; choose pad or crop")
    S = vision_cfg.image_size
    w, h = image.size
    size = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)  # int() truncates, as transformers does
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - S) // 2, (size[1] - S) // 2
    return normalize(image.crop((left, top, left + S, top + S)), vision_cfg)


def normalize(image: Image.Image, vision_cfg) -> torch.Tensor:
    """PIL image -> (3, H, W): pixels scaled to [0, 1], then standardised by the tower's mean and std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    mean, std = torch.tensor(vision_cfg.image_mean), torch.tensor(vision_cfg.image_std)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def preprocess_anyres(image: Image.Image, vision_cfg, pinpoints) -> torch.Tensor:
    """PIL image -> (1 + rows*cols, 3, S, S): the base view, then the tiles of its best canvas in row-major order.

    transformers' LlavaNextImageProcessor step by step: bicubic resize into the canvas keeping the aspect ratio,
    pad, cut into S x S tiles. Its quirks are kept, as checkpoints were trained with them.
    """
    S, (w, h) = vision_cfg.image_size, image.size
    canvas = anyres.select_best_resolution((h, w), pinpoints)
    fh, fw = anyres.fit_size((h, w), canvas)
    top, left = anyres.pad_offsets((h, w), canvas)
    padded = Image.new("RGB", canvas[::-1], (0, 0, 0))  # quirk: padded with black, not the mean colour
    padded.paste(image.resize((fw, fh), Image.Resampling.BICUBIC), (left, top))
    tiles = [padded.crop((x, y, x + S, y + S)) for y in range(0, canvas[0], S) for x in range(0, canvas[1], S)]
    base = image.resize((S, S), Image.Resampling.BICUBIC)  # quirk: the base view is squashed, not padded to square
    return torch.stack([normalize(view, vision_cfg) for view in [base, *tiles]])


def preprocess_video(frames: list[Image.Image], vision_cfg) -> torch.Tensor:
    """Video frames (video.read_video) -> (F, 3, S, S): each squashed to the tower's size, as OneVision's video
    processor does (its torchvision resize may differ from PIL's bicubic in the last digits; not compared)."""
    S = vision_cfg.image_size
    return torch.stack([normalize(frame.resize((S, S), Image.Resampling.BICUBIC), vision_cfg) for frame in frames])


# ----------------------------------------------------------------------------- LLaVA records


class Skipped(NamedTuple):
    """What a dataset returns for a record found bad only when its sample is built; collate drops it."""

    index: int  # the record's position in its file
    reason: str


def encode_sample(record: dict, images: list, tokenizer, cfg, template: str, max_len: int | None,
                  image_mode: str, videos: list = ()) -> dict:
    """One record (conversations + PIL images and videos' frames, each in tag order) -> the sample dict collate
    batches. record["media"] says which tags are videos ("image"/"video" in text order; default: the images,
    then the videos)."""
    sizes, tiled = [(im.height, im.width) for im in images], cfg.tiles(len(images))
    input_ids, labels = encode_ids(record, images, tokenizer, cfg, template, max_len, videos)
    return {"id": record["id"], "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "pixel_values": images_to_pixels(images, cfg, image_mode, tiled),  # (T,), (T,), (views, 3, S, S) or None
            "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2) if images else None,  # (n_images, 2)
            "image_tiled": torch.full((len(images),), tiled) if images else None,  # (n_images,) bool
            "videos": torch.stack([preprocess_video(clip, cfg.vision) for clip in videos]) if videos else None}
    # videos: (V, F, 3, S, S)


def encode_ids(record: dict, images: list, tokenizer, cfg, template: str, max_len: int | None,
               videos: list = ()) -> tuple[list[int], list[int]]:
    """A record's (input_ids, labels), media placeholders included; no pixels.

    With anyres each image has its own token count, so the text is tokenized with one placeholder per tag and
    each is then grown to cfg.image_tokens(its size), a video's to cfg.video_tokens(its frames) video
    placeholders; max_len is lowered by the growth, so the cut falls where it would in the grown sequence.
    """
    counts, fills = media_tokens(cfg, record.get("media"), images, videos)
    if max_len is not None:
        max_len -= sum(counts) - len(counts)
        if max_len < 1:
            raise TooLong(f"the images and videos take {sum(counts)} tokens, more than max_len")
    input_ids, labels = encode_conversation(tokenizer, record["conversations"], template, cfg.image_token_id, 1,
                                            max_len, cfg.system)
    return expand_images(input_ids, labels, counts, cfg.image_token_id, fills)


def ground_pairs(boxes: list, input_ids: list[int], labels: list[int], cfg, words: list | None = None) -> torch.Tensor:
    """(N, 3) (query, key, kind) positions for the grounding loss (model.grounding_loss): from the position that
    predicts each answer's first token to every image token whose patch centre lies in that answer's box (x0, y0,
    x1, y1 in fractions of the image), kind 0; to the first token, an attention sink, for an empty box (no such
    object); none for a None box. With words (per answer, the positions of the question's tokens that name its
    object), also to each of those, kind 1. One image at base resolution only, so token k is patch k of the grid."""
    G = cfg.vision.grid
    if input_ids.count(cfg.image_token_id) != G * G or cfg.grid_pinpoints:
        raise ValueError(f"grounding needs one image of {G * G} tokens, one per patch, "
                         f"not {input_ids.count(cfg.image_token_id)}")
    image = input_ids.index(cfg.image_token_id)
    starts = [t for t in range(1, len(labels)) if labels[t] != IGNORE and labels[t - 1] == IGNORE]  # answers
    words = words or [[] for _ in boxes]
    pairs = []
    n = len(starts)  # a cut (max_len) may drop the last answers
    for start, box, named in zip(starts, boxes[:n], words[:n], strict=True):
        if box is None:
            continue
        keys = [0] if not box else [image + i * G + j for i in range(G) for j in range(G)
                                    if box[0] <= (j + 0.5) / G < box[2] and box[1] <= (i + 0.5) / G < box[3]]
        if not keys:
            raise ValueError(f"no patch of the tower's {G}x{G} grid has its centre in the box {box}")
        pairs += [(start - 1, k, 0) for k in keys] + [(start - 1, k, 1) for k in named]
    return torch.tensor(pairs, dtype=torch.long).view(-1, 3)


def media_tokens(cfg, media: list[str] | None, images: list, videos: list) -> tuple[list[int], list[int]]:
    """(placeholder count, placeholder id) for each tag in text order: media lists the tags' kinds ("image",
    "video"; None: the images, then the videos), images are PIL images, videos lists of frames."""
    media = media or ["image"] * len(images) + ["video"] * len(videos)
    tiled = cfg.tiles(len(images))
    per_image = iter([cfg.image_tokens((im.height, im.width), tiled) for im in images])
    per_video = iter([cfg.video_tokens(len(clip)) for clip in videos])
    counts = [next(per_image) if m == "image" else next(per_video) for m in media]
    return counts, [cfg.image_token_id if m == "image" else cfg.video_token_id for m in media]


def images_to_pixels(images: list, cfg, image_mode="pad", tiled=True) -> torch.Tensor | None:
    """PIL images -> the model's pixel_values: (N, 3, S, S), one view per image, or with anyres each image's
    base view and tiles in turn; None without images. tiled=False (cfg.tiles: OneVision's multi-image samples)
    gives an anyres model one view per image, padded to a square with the mean colour as transformers does."""
    if not images:
        return None
    if cfg.grid_pinpoints and not tiled:
        return torch.stack([preprocess(im, cfg.vision, "pad") for im in images])
    if cfg.grid_pinpoints:
        return torch.cat([preprocess_anyres(im, cfg.vision, cfg.grid_pinpoints) for im in images])
    return torch.stack([preprocess(im, cfg.vision, image_mode) for im in images])


def expand_images(ids: list[int], labels: list[int], counts: list[int], image_token_id: int, fills=None):
    """Grow the k-th image placeholder into counts[k] copies (its label, IGNORE, copied along), of fills[k]
    (default: the placeholder itself; a video's tag becomes video placeholders)."""
    if ids.count(image_token_id) != len(counts):
        raise ValueError(f"{ids.count(image_token_id)} image placeholders for {len(counts)} images")
    fills = fills or [image_token_id] * len(counts)
    grown_ids, grown_labels, k = [], [], 0
    for token, label in zip(ids, labels, strict=True):
        n = 1
        if token == image_token_id:
            n, token, k = counts[k], fills[k], k + 1
        grown_ids += [token] * n
        grown_labels += [label] * n
    return grown_ids, grown_labels


class MalformedLine(NamedTuple):
    """A JSONL line that is not valid JSON: in JSON Lines each line is its own record, so it is skipped alone."""

    line: int  # 1-based, as editors count


def read_records(path) -> list:
    """The records of a JSON list or a JSONL file. A JSON list that does not parse is a DataError naming the
    line; a JSONL line that does not parse becomes a MalformedLine, which clean_record skips."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if str(path).endswith(".jsonl"):
        return [parse_line(line, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    records = parse_json(text, path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    return records


def parse_json(text: str, path, first_line=1):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = first_line + err.lineno - 1
        raise DataError(f"{path}: invalid JSON at line {line} column {err.colno}") from None


def parse_line(line: str, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return MalformedLine(number)


def clean_record(record, index: int) -> dict | str:
    """A record as {"index", "id", "images", "videos", "media", "conversations"} with roles human/gpt, or why it
    is unusable.

    "image" and "video" are a path or a list of paths. Each image has an `<image>` tag, each video a `<video>`
    tag; a record with one video and no image may tag it `<image>`, as LLaVA-OneVision's data does. `media`
    lists the tags' kinds in text order, and every tag is written `<image>` (one placeholder, grown later). As
    LLaVA does, a lone tag moves to the front of its turn: "<image>\\n{question}".
    """
    if isinstance(record, MalformedLine):
        return "malformed line"
    if not isinstance(record, dict):
        return "malformed record"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "empty conversation"
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and t["value"].strip() for t in turns):
        return "turn without value"
    roles = [ROLES.get(t.get("from")) for t in turns]
    if None in roles:
        return "unknown role"
    if len(roles) % 2 or roles != ["human", "gpt"] * (len(roles) // 2):
        return "wrong role order"
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return "malformed record"
    videos = record.get("video") or []
    videos = [videos] if isinstance(videos, str) else videos
    if not isinstance(videos, list) or not all(isinstance(p, str) for p in videos):
        return "malformed record"
    values = [t["value"] for t in turns]
    if len(videos) == 1 and not images and not any(VIDEO in v for v in values):
        values = [v.replace(IMAGE, VIDEO) for v in values]  # OneVision's data: the video's tag is <image>
    tags = [tag for v in values for tag in re.findall(f"{IMAGE}|{VIDEO}", v)]
    if tags.count(IMAGE) != len(images) or tags.count(VIDEO) != len(videos):
        return "image/tag count mismatch"
    values = [v.replace(VIDEO, IMAGE) for v in values]
    if len(tags) == 1:
        values = [(IMAGE + "\n" + v.replace(IMAGE, "").strip()).strip() if IMAGE in v else v for v in values]
    conversations = [{"from": role, "value": v} for role, v in zip(roles, values, strict=True)]
    return {"index": index, "id": str(record.get("id", index)), "images": images, "videos": videos,
            "media": ["image" if tag == IMAGE else "video" for tag in tags], "conversations": conversations}


def skip_report(skipped: dict[int, str], total: int, malformed_lines: list[int] = ()) -> str:
    """"skipped 7 of 10,000 records: 3 missing image, 2 malformed line (lines 12, 40), ...", most common reason
    first; the first few malformed JSONL lines are named, so they can be found and fixed."""
    shown = ", ".join(map(str, malformed_lines[:5])) + (", ..." if len(malformed_lines) > 5 else "")
    where = {"malformed line": f" (line{'s' if len(malformed_lines) > 1 else ''} {shown})"} if shown else {}
    reasons = ", ".join(f"{n:,} {reason}{where.get(reason, '')}"
                        for reason, n in Counter(skipped.values()).most_common())
    return f"skipped {len(skipped):,} of {total:,} records" + (f": {reasons}" if reasons else "")


class PackedRecords:
    """A read-only sequence of records, held as one numpy byte buffer of JSON plus offsets.

    Forked DataLoader workers share the parent's memory until a page is written to, and a list of dicts is
    written to on every read (reference counts) and by every garbage collection (object headers): each worker
    ends up with its own copy of it. Two numpy arrays are two objects, however many records they hold.
    """

    def __init__(self, records):
        data, offsets = bytearray(), [0]
        for record in records:
            data += json.dumps(record).encode()
            offsets.append(len(data))
        self.data = np.frombuffer(data, dtype=np.uint8)
        self.offsets = np.array(offsets, dtype=np.int64)  # record i is data[offsets[i]:offsets[i + 1]]

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} is outside 0..{len(self) - 1}")
        return json.loads(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())


class LlavaDataset(Dataset):
    """LLaVA-format conversations from a JSON list or JSONL file, images from image_folder.

    Text problems are found when the file is read, image and length problems when a sample is built: then
    __getitem__ returns a Skipped, never raises. `skipped` maps record index -> reason. DataLoader workers
    hold copies of the dataset, so merge each batch's "skipped" into it before calling skip_report().
    image_folder=None means the data file's own folder.
    """

    def __init__(self, path, image_folder, tokenizer, cfg, template="vicuna_v1", max_len=2048, image_mode="pad",
                 frames=8):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
        raw = read_records(path)
        self.image_folder = Path(image_folder) if image_folder is not None else Path(path).parent
        self.tokenizer, self.cfg, self.template = tokenizer, cfg, template
        self.max_len, self.image_mode, self.frames = max_len, image_mode, frames  # frames sampled per video
        self.num_records, self.skipped = len(raw), {}
        self.malformed_lines = [r.line for r in raw if isinstance(r, MalformedLine)]
        media = set()  # "images", "videos": what the usable records hold

        def usable(raw):
            for index in range(len(raw)):
                record, raw[index] = raw[index], None  # each parsed record is freed once packed: one copy at a time
                clean = clean_record(record, index)
                if isinstance(clean, str):
                    self.skipped[index] = clean
                    continue
                media.update(key for key in ("images", "videos") if clean[key])
                yield clean

        self.records = PackedRecords(usable(raw))
        del raw
        if media and not self.image_folder.is_dir():
            raise DataError(f"{self.image_folder}: no such image folder")
        if "videos" in media and getattr(cfg, "video_token_id", None) is None:
            raise DataError(f"{path}: holds video records, but the model takes no video (no video_token_id)")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i) -> dict | Skipped:
        record = self.records[i]
        media = "image"  # what is being read, for the skip's reason
        try:
            images = [load_image(self.image_folder / p) for p in record["images"]]
            media = "video"
            videos = [read_video(self.image_folder / p, self.frames) for p in record["videos"]]
            return encode_sample(record, images, self.tokenizer, self.cfg, self.template, self.max_len,
                                 self.image_mode, videos)
        except FileNotFoundError:
            reason = f"missing {media}"
        except (DataError, VideoError):
            reason = f"unreadable {media}"
        except TooLong:
            reason = "too long"
        self.skipped[record["index"]] = reason
        return Skipped(record["index"], reason)

    def skip_report(self, skipped: dict[int, str] | None = None) -> str:
        """The report of self.skipped, or of `skipped` (what the workers and ranks found, merged)."""
        return skip_report(self.skipped if skipped is None else skipped, self.num_records, self.malformed_lines)

    def texts(self) -> list[str]:
        """Every conversation as tokenizer-training text (vicuna_v1 wording, which covers plain's)."""
        return [corpus_text(self.records[i]["conversations"]) for i in range(len(self.records))]


# ----------------------------------------------------------------------------- batches


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group sample indices into rows of at most max_len tokens, first-fit by decreasing length.

    Finetuning answers vary from a word to paragraphs; packing short samples together wastes less compute
    on padding. A sample longer than max_len gets a row of its own.
    """
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(max_len - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def collate(samples: list, pad_id: int, pack_len: int | None = None) -> dict:
    """Right-pad a list of sample dicts into a batch; Skipped samples are dropped and reported.

    pixel_values holds every image in placeholder order, row by row. num_tokens counts supervised labels, so
    the training loop can normalise the loss over the whole global batch. With pack_len, several samples share
    a row (see pack_rows) and segment_ids (R, T) says which sample each token belongs to (-1: padding), so the
    model can keep them from attending to each other.
    """
    skipped = {s.index: s.reason for s in samples if isinstance(s, Skipped)}
    samples = [s for s in samples if not isinstance(s, Skipped)]
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_rows(lengths, pack_len) if pack_len else [[i] for i in range(len(samples))]
    R, T = len(rows), max((sum(lengths[i] for i in row) for row in rows), default=0)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    grounds = []  # each sample's (row, query, key, kind) grounding pairs, where the sample sits in the batch
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row):
            end = start + lengths[i]
            input_ids[r, start:end], labels[r, start:end] = samples[i]["input_ids"], samples[i]["labels"]
            segment_ids[r, start:end] = segment
            if samples[i].get("ground") is not None:
                pairs = samples[i]["ground"].clone()  # (N, 3): query, key, kind
                pairs[:, :2] += start
                grounds.append(torch.cat([torch.full((len(pairs), 1), r), pairs], dim=1))
            start = end
    order = [samples[i] for row in rows for i in row]
    images = [s["pixel_values"] for s in order if s["pixel_values"] is not None]
    sizes = [s["image_sizes"] for s in order if s.get("image_sizes") is not None]
    tiled = [s["image_tiled"] for s in order if s.get("image_tiled") is not None]
    videos = [s["videos"] for s in order if s.get("videos") is not None]
    return {
        "ids": [s["id"] for s in order],
        "input_ids": input_ids,  # (R, T)
        "labels": labels,  # (R, T)
        "attention_mask": segment_ids >= 0,  # (R, T)
        "segment_ids": segment_ids if pack_len else None,  # (R, T)
        "pixel_values": torch.cat(images) if images else None,  # (N, 3, S, S); with anyres (views, 3, S, S)
        "image_sizes": torch.cat(sizes) if sizes else None,  # (N, 2): each image's (height, width)
        "image_tiled": torch.cat(tiled) if tiled else None,  # (N,) bool: anyres images cut into tiles
        "videos": torch.cat(videos) if videos else None,  # (V, F, 3, S, S)
        "num_tokens": int((labels != IGNORE).sum()),
        "ground": torch.cat(grounds) if grounds else None,  # (N, 4): row, query, key, kind (model.grounding_loss)
        "num_grounds": sum(len(g[:, :2].unique(dim=0)) for g in grounds),  # answers grounded (queries)
        "skipped": skipped,  # record index -> reason
    }


class GlobalBatchSampler:
    """A DataLoader batch_sampler whose optimizer steps see the same samples on any number of processes.

    Global batch g of an epoch is order[g*G : (g+1)*G], where `order` depends on (seed, epoch) only: a
    permutation, or 0, 1, 2, ... with shuffle=False (for a stream that is random already, like ShapesWorld).
    Rank r takes the r-th of world_size equal slices and yields it as micro-batches, so 1 x 8, 1 x 4 with
    accumulation 2, and 2 ranks x 4 all train on the same 8 samples each step. A last partial global batch is
    dropped; start_step skips steps already taken (exact resume).
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed=0, rank=0, world_size=1,
                 micro_batch_size: int | None = None, epoch=0, start_step=0, shuffle=True):
        per_rank, rest = divmod(global_batch_size, world_size)
        micro_batch_size = micro_batch_size or per_rank
        if rest or per_rank % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} does not split into {world_size} ranks of "
                             f"micro-batches of {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.global_batch_size, self.seed, self.epoch = num_samples, global_batch_size, seed, epoch
        self.rank, self.per_rank, self.micro_batch_size = rank, per_rank, micro_batch_size
        self.start_step, self.shuffle = start_step, shuffle
        self.accum = per_rank // micro_batch_size  # micro-batches per step on each rank
        self.steps = num_samples // global_batch_size  # optimizer steps per epoch

    def __len__(self):
        return max(self.steps - self.start_step, 0) * self.accum

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples) if self.shuffle else None
        for step in range(self.start_step, self.steps):
            for m in range(self.accum):
                start = step * self.global_batch_size + self.rank * self.per_rank + m * self.micro_batch_size
                stop = start + self.micro_batch_size
                yield order[start:stop].tolist() if order is not None else list(range(start, stop))


# ----------------------------------------------------------------------------- ShapesWorld

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 100, 235), "yellow": (240, 210, 40),
    "purple": (155, 75, 210), "orange": (245, 135, 30), "white": (240, 240, 240), "pink": (245, 140, 195),
    "cyan": (40, 205, 215), "brown": (140, 90, 45),
}
SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")
SIZES = {"small": 0.27, "large": 0.42}  # half the object's extent, as a fraction of a grid cell
POSITIONS = {  # cell names, row by row; the answer to "where is ...?"
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"),
}
PHRASES = {"left": "on the left", "right": "on the right", "center": "in the center"}  # the rest: "at the ..."
CATEGORIES = ("color", "shape", "count", "position", "exists")
ABSENT = -1  # the cell of the object a question names, when the scene has no such object
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # ShapesWorld clips: (dx, dy) per step
BACKGROUND = (60, 60, 68)


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    position: str  # the name of its grid cell
    x: float  # centre and half-extent, in output pixels
    y: float
    r: float


@dataclass
class ShapesWorld:
    """Scenes of 1 to max_objects coloured shapes, one per cell of a grid x grid layout, with captions and
    short-answer questions whose answers follow from the scene. Scene i of a split depends only on
    (seed, split, i): the train stream is unlimited, the test split is its own fixed set of test_size scenes.
    Every (colour, shape) pair appears at most once per scene, so "the red circle" is never ambiguous.
    """

    image_size: int = 64
    grid: int = 3  # 2 or 3
    max_objects: int = 4
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    jitter: float = 0.5  # how far an object may wander within its cell, 0..1 of the free space
    texture: float = 4.0  # std of the background's pixel noise (0..255 scale); 0 = plain
    seed: int = 0
    test_size: int = 1000
    train_size: int = 0  # 0: an unlimited train stream; N: train scenes 0..N-1 repeat (a finite dataset)
    categories: tuple[str, ...] = CATEGORIES  # the question types to ask
    questions: int = 1  # question turns per train conversation; the test split asks one, so scores stay single-turn
    object_scale: float = 1.0  # < 1 shrinks every object: drawn large, too small to read once squashed (anyres)
    frames: int = 0  # > 0: each scene is a clip of this many frames, asked "which way ... moving?"/"... appears last?"

    def __post_init__(self):
        self.colors, self.shapes, self.categories = tuple(self.colors), tuple(self.shapes), tuple(self.categories)
        for name, given, known in [("colour", self.colors, PALETTE), ("shape", self.shapes, SHAPES),
                                   ("category", self.categories, CATEGORIES), ("grid", (self.grid,), POSITIONS)]:
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                raise ValueError(f"unknown {name} {unknown or given}; choose from {', '.join(map(str, known))}")
        if set(self.categories) <= {"color", "shape"}:
            raise ValueError(f"categories {self.categories} need count, position or exists too: a scene whose "
                             "shapes and colours all repeat allows no colour or shape question")
        if self.frames < 0 or self.frames == 1:
            raise ValueError(f"frames must be 0 (still images) or at least 2 (clips), got {self.frames}")
        if not 0 < self.object_scale <= 1:
            raise ValueError(f"object_scale must be in (0, 1], got {self.object_scale}")
        if self.questions < 1 or self.train_size < 0:
            raise ValueError(f"questions must be at least 1 and train_size at least 0, got {self.questions} and "
                             f"{self.train_size}")
        if not 1 <= self.max_objects <= min(self.grid**2, len(self.colors) * len(self.shapes)):
            raise ValueError(f"max_objects {self.max_objects} does not fit a {self.grid}x{self.grid} grid with "
                             f"{len(self.colors)} colours x {len(self.shapes)} shapes")

    def rng(self, split: str, index: int, purpose: str) -> random.Random:
        """An independent random stream per (seed, split, index, purpose); str seeds hash the same everywhere."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; choose train or test")
        if split == "test" and not 0 <= index < self.test_size:
            raise IndexError(f"test scene {index} is outside the test split (test_size {self.test_size})")
        if split == "train" and self.train_size:
            index %= self.train_size
        return random.Random(f"shapes/{self.seed}/{split}/{index}/{purpose}")

    def scene(self, index: int, split="train") -> list[SceneObject]:
        rng = self.rng(split, index, "scene")
        n = rng.randint(1, self.max_objects)
        pairs = rng.sample([(c, s) for c in self.colors for s in self.shapes], n)
        cells = sorted(rng.sample(range(self.grid**2), n))  # reading order, so captions are predictable
        cell = self.image_size / self.grid
        objects = []
        for (color, shape), c in zip(pairs, cells, strict=True):
            size = rng.choice(tuple(SIZES))
            r = SIZES[size] * cell * self.object_scale
            slack = (cell / 2 - r) * self.jitter
            row, col = divmod(c, self.grid)
            x, y = (col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack)
            objects.append(SceneObject(shape, color, size, POSITIONS[self.grid][c], x, y, r))
        return objects

    def render(self, objects: list[SceneObject], index: int, split="train") -> Image.Image:
        """Draw 4x larger and average down, for clean anti-aliased edges; then texture the background."""
        S, k = self.image_size, 4
        image = Image.new("RGB", (S * k, S * k), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for o in objects:
            draw_shape(draw, o.shape, o.x * k, o.y * k, o.r * k, PALETTE[o.color])
        image = image.reduce(k)  # the mean of each k x k block
        if not self.texture:
            return image
        pixels = np.asarray(image)  # (S, S, 3)
        rng = np.random.default_rng(self.rng(split, index, "texture").getrandbits(64))
        noise = rng.standard_normal((S, S, 1), dtype=np.float32) * self.texture
        # (S, S, 1): pixels untouched by any shape; per channel, as numpy's .all(-1) is slow on an axis of 3
        background = np.logical_and.reduce([pixels[..., c] == v for c, v in enumerate(BACKGROUND)])[..., None]
        return Image.fromarray((pixels + background * noise).round().clip(0, 255).astype(np.uint8))

    def caption(self, objects: list[SceneObject], moves: list[str] | None = None, late: int | None = None) -> str:
        """"a large red circle at the top left and a small blue square in the center". A clip's caption says
        where each object moves and names the one that appears last at the end ("... and then a small blue
        square at the bottom right moving up"), so the caption stage teaches what its questions ask."""
        phrases = [f"a {o.size} {o.color} {o.shape} {PHRASES.get(o.position, 'at the ' + o.position)}"
                   + (f" moving {moves[k]}" if moves else "") for k, o in enumerate(objects)]
        if late is not None and len(phrases) > 1:
            phrases.append("then " + phrases.pop(late))
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def question(self, objects: list[SceneObject], rng: random.Random) -> tuple[str, str, str, int | None]:
        """(question, answer, category, cell): a category drawn evenly among those the scene allows; existence
        questions are answered yes half the time. cell is the grid cell (row-major) of the one object the
        question asks about, ABSENT when it names an object the scene lacks, None for a count."""
        shapes, colors = Counter(o.shape for o in objects), Counter(o.color for o in objects)
        unique_shape = [o for o in objects if shapes[o.shape] == 1]  # "the circle" names exactly one object
        unique_color = [o for o in objects if colors[o.color] == 1]
        allowed = [c for c in self.categories if (c != "color" or unique_shape) and (c != "shape" or unique_color)]
        if not allowed:
            raise ValueError(f"this scene allows none of the categories {self.categories}")
        category = rng.choice(allowed)
        cell = POSITIONS[self.grid].index
        if category == "color":
            o = rng.choice(unique_shape)
            return f"What color is the {o.shape}?", o.color, category, cell(o.position)
        if category == "shape":
            o = rng.choice(unique_color)
            return f"What shape is the {o.color} object?", o.shape, category, cell(o.position)
        if category == "count":
            return "How many objects are there?", str(len(objects)), category, None
        if category == "position":
            o = rng.choice(objects)
            return f"Where is the {o.color} {o.shape}?", o.position, category, cell(o.position)
        present = [(o.color, o.shape) for o in objects]
        absent = [(c, s) for c in self.colors for s in self.shapes if (c, s) not in present]
        if rng.random() < 0.5 or not absent:
            o = rng.choice(objects)  # the same draw as from `present`, which lists the objects in order
            return f"Is there a {o.color} {o.shape}?", "yes", category, cell(o.position)
        return "Is there a {} {}?".format(*rng.choice(absent)), "no", category, ABSENT

    def conversation(self, objects: list[SceneObject], index: int, task="qa", split="train") -> tuple[list, str, list]:
        """(LLaVA conversations, category, cells) about scene `index`, whose objects are given. A train
        conversation asks `questions` distinct questions in turn, as LLaVA-Instruct does: several answers per image
        give the language model more supervised tokens for the same image work. The category is the last
        question's; cells holds, per answer, the cell of the object it is about (see question; None: a caption)."""
        if task == "caption":
            turns = [("Describe the image.", self.caption(objects), "caption", None)]
        elif task == "qa":
            rng, turns = self.rng(split, index, "question"), []
            for _ in range(self.questions if split == "train" else 1):
                for _ in range(10):  # a scene with one object allows few distinct questions: then stop early
                    turn = self.question(objects, rng)
                    if all(turn[0] != t[0] for t in turns):
                        turns.append(turn)
                        break
        else:
            raise ValueError(f"unknown task {task!r}; choose caption or qa")
        conversations = []
        for k, (question, answer, _, _) in enumerate(turns):
            conversations += [{"from": "human", "value": f"{IMAGE}\n{question}" if k == 0 else question},
                              {"from": "gpt", "value": answer}]
        return conversations, turns[-1][2], [t[3] for t in turns]

    def record(self, index: int, task="qa", split="train") -> dict:
        """A LLaVA record with the image in memory: {"id", "image": PIL.Image, "conversations", "category",
        "ground": each answer's object as a box (see ground_pairs)}; with
        frames > 0, {"id", "video": [PIL.Image] * frames, "conversations", "category"} (see clip)."""
        if self.frames:
            return self.clip(index, split, task=task)
        objects = self.scene(index, split)
        conversations, category, cells = self.conversation(objects, index, task, split)
        image = self.render(objects, index, split)
        g = self.grid  # each answer's object as its cell's box, in fractions of the image (None: no one object)
        boxes = [None if c is None else () if c == ABSENT else
                 (c % g / g, c // g / g, (c % g + 1) / g, (c // g + 1) / g) for c in cells]
        return {"id": f"shapes-{split}-{index:06d}", "image": image, "conversations": conversations,
                "category": category, "ground": boxes}

    def clip(self, index: int, split="train", render=True, task="qa") -> dict:
        """Scene `index` as a moving-shapes clip: each object drifts half a cell in its own direction over the
        frames, and one object, the last to appear, enters at a random later frame. One question, either the
        drift of an object named by colour and shape, or which object appears last (category "motion"/"last"),
        or for task "caption" the clip's caption."""
        rng, F = self.rng(split, index, "motion"), self.frames
        objects, step = self.scene(index, split), self.image_size / self.grid / 2 / max(F - 1, 1)
        moves = [rng.choice(tuple(MOVES)) for _ in objects]
        late, enters = rng.randrange(len(objects)), rng.randint(1, F - 1) if F > 1 else 0
        video = []
        for t in range(F if render else 0):
            shift = t - (F - 1) / 2  # centred on the object's cell
            shown = [dataclasses.replace(o, x=o.x + MOVES[m][0] * step * shift, y=o.y + MOVES[m][1] * step * shift)
                     for k, (o, m) in enumerate(zip(objects, moves, strict=True)) if k != late or t >= enters]
            video.append(self.render(shown, index, split))
        if task not in ("qa", "caption"):
            raise ValueError(f"unknown task {task!r}; choose caption or qa")
        if task == "caption":
            question, answer, category = "Describe the video.", self.caption(objects, moves, late), "caption"
        elif len(objects) > 1 and rng.random() < 0.5:
            o = objects[late]
            question, answer, category = "Which object appears last?", f"{o.color} {o.shape}", "last"
        else:
            k = rng.randrange(len(objects))
            question, answer, category = f"Which way is the {objects[k].color} {objects[k].shape} moving?", \
                moves[k], "motion"
        conversations = [{"from": "human", "value": f"{IMAGE}\n{question}"}, {"from": "gpt", "value": answer}]
        return {"id": f"shapes-{split}-{index:06d}", "video": video, "conversations": conversations,
                "category": category}

    def texts(self, n: int) -> list[str]:
        """Tokenizer-training text: the caption and the question of the first n train scenes, as prompts."""
        if self.frames:
            return [corpus_text(self.clip(i, render=False, task=task)["conversations"]) for i in range(n)
                    for task in ("caption", "qa")]
        scenes = [self.scene(i) for i in range(n)]
        return [corpus_text(self.conversation(scenes[i], i, task)[0]) for i in range(n) for task in ("caption", "qa")]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, color: tuple):
    """A filled shape centred at (x, y) that fits in a box of half-side r."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "square":
        draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)], fill=color)
    elif shape == "cross":
        arm = 0.34 * r
        draw.rectangle([x - r, y - arm, x + r, y + arm], fill=color)
        draw.rectangle([x - arm, y - r, x + arm, y + r], fill=color)
    elif shape == "star":
        points = [(x + rad * math.sin(i * math.pi / 5), y - rad * math.cos(i * math.pi / 5))
                  for i, rad in enumerate([r, 0.45 * r] * 5)]
        draw.polygon(points, fill=color)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.75 * r, y), (x, y + r), (x - 0.75 * r, y)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


class ShapesDataset(Dataset):
    """ShapesWorld scenes as the same sample dicts LlavaDataset yields: sample i is scene i of the split. With
    ground=True each also holds its grounding pairs (ground_pairs), which only ShapesWorld can know; ground_words
    adds the pairs that point at the question's words naming the object.

    The train split is a stream: len() is only a bound, so sample it with GlobalBatchSampler(shuffle=False).
    template defaults to plain for captions (pretraining) and vicuna_v1 for questions (finetuning).
    """

    def __init__(self, world: ShapesWorld, tokenizer, cfg, task="qa", split="train", size: int | None = None,
                 template: str | None = None, max_len: int | None = None, image_mode="pad", ground=False,
                 ground_words=False):
        self.world, self.tokenizer, self.cfg, self.task, self.split = world, tokenizer, cfg, task, split
        self.size = size or (world.test_size if split == "test" else 2**31 - 1)
        self.template = template or ("plain" if task == "caption" else "vicuna_v1")
        self.max_len, self.image_mode, self.ground, self.ground_words = max_len, image_mode, ground, ground_words

    def __len__(self):
        return self.size

    def __getitem__(self, i) -> dict:
        record = self.world.record(i, self.task, self.split)
        images, videos = ([record["image"]], []) if "image" in record else ([], [record["video"]])
        sample = encode_sample(record, images, self.tokenizer, self.cfg, self.template, self.max_len, self.image_mode,
                               videos)
        if self.ground:  # (N, 3) (query, key, kind) positions for the grounding loss
            ids = sample["input_ids"].tolist()
            words = self.naming_tokens(record, images, videos, ids) if self.ground_words else None
            sample["ground"] = ground_pairs(record["ground"], ids, sample["labels"].tolist(), self.cfg, words)
        return sample

    def naming_tokens(self, record: dict, images: list, videos: list, input_ids: list[int]) -> list[list[int]]:
        """Per question, the positions of the tokens that spell its colour and shape words: the words that name
        the object it asks about. Any tokenizer, no offsets needed: encode the record again with those words in
        capitals; every token that holds one of their letters changes, so the span where the ids differ spells them
        (a swap for another word could share a token: "circle" and "cross" may both start with " c")."""
        turns, spans, names = record["conversations"], [], set(self.world.colors + self.world.shapes)
        for k in range(0, len(turns), 2):  # the questions
            text = re.sub(r"\b[a-z]+\b", lambda m: m[0].upper() if m[0] in names else m[0], turns[k]["value"])
            swapped = turns[:k] + [dict(turns[k], value=text)] + turns[k + 1 :]
            ids, _ = encode_ids(dict(record, conversations=swapped), images, self.tokenizer, self.cfg, self.template,
                                self.max_len, videos)
            start = len(os.path.commonprefix([input_ids, ids]))  # commonprefix works on any sequences
            end = len(input_ids) - len(os.path.commonprefix([input_ids[start:][::-1], ids[start:][::-1]]))
            spans.append(list(range(start, end)))
        return spans


# ----------------------------------------------------------------------------- export


def export_shapes(world: ShapesWorld, out_dir, n: int, task="qa", split="train") -> Path:
    """Write n scenes as LLaVA JSON (out_dir/{task}_{split}.json) plus PNGs (out_dir/images/)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        record = world.record(i, task, split)
        image_path = f"images/{split}_{i:06d}.png"  # captions and questions of scene i share the image
        record["image"].save(out_dir / image_path)
        records.append({k: v for k, v in record.items() if k != "ground"} | {"image": image_path})  # LLaVA's keys
    json_path = out_dir / f"{task}_{split}.json"
    json_path.write_text(json.dumps(records, indent=1))
    return json_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--export-shapes", metavar="DIR", required=True, default=argparse.SUPPRESS,
                        help="write ShapesWorld scenes to DIR as LLaVA JSON plus PNG images")
    parser.add_argument("--n", type=int, default=1000, help="number of scenes")
    parser.add_argument("--task", choices=("qa", "caption"), default="qa",
                        help="qa: short-answer questions (finetuning); caption: descriptions (pretraining)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="train stream or held-out test")
    parser.add_argument("--seed", type=int, default=0, help="world seed; scenes are a function of (seed, index)")
    parser.add_argument("--image-size", type=int, default=ShapesWorld.image_size, help="image side in pixels")
    parser.add_argument("--grid", type=int, choices=(2, 3), default=ShapesWorld.grid, help="grid x grid cells")
    args = parser.parse_args(argv)
    try:
        world = ShapesWorld(image_size=args.image_size, grid=args.grid, seed=args.seed,
                            test_size=max(args.n, ShapesWorld.test_size))
        json_path = export_shapes(world, args.export_shapes, args.n, args.task, args.split)
    except (DataError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.n:,} {args.task} records to {json_path} (images in {json_path.parent / 'images'})")


if __name__ == "__main__":
    main()
