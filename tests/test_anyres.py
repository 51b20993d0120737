"""anyres (LLaVA-NeXT / OneVision tiles): geometry, preprocessing and feature merging against transformers."""

import dataclasses
import itertools
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    VOCAB,
    clip_vision_config,
    convert,
    image_prompt,
    llama_config,
    load_hf,
    random_init,
    rel_err,
    save,
    siglip_vision_config,
    transformers,
)
from PIL import Image

import anyres
import sample
from data import LlavaDataset, ShapesWorld, collate, encode_sample, preprocess_anyres, preprocess_video
from llama import LlamaConfig
from model import VLM, VLMConfig
from tokenizer import TooLong, build_prompt, tokenize_prompt, train_tokenizer
from video import read_video
from vit import ViTConfig, siglip_config

TILE = 32  # the tiny towers' image size
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # llava-hf's defaults, scaled from 336 to 32
# (h, w): wide, tall, square, one that needs padding, one larger than every pinpoint, one tiny, one extreme
SIZES = [(40, 90), (90, 40), (50, 50), (37, 53), (300, 500), (7, 11), (20, 400)]


def photo(h: int, w: int, seed=0) -> Image.Image:
    """A smooth random RGB image: resampling it exercises interpolation, unlike flat noise or a flat colour."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    noisy = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    return Image.fromarray((noisy + g.integers(-20, 21, noisy.shape)).clip(0, 255).astype(np.uint8))


def next_processor(vision: ViTConfig, pinpoints=PINPOINTS):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    S = vision.image_size
    return LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=pinpoints, image_mean=list(vision.image_mean),
                                      image_std=list(vision.image_std))


@pytest.mark.parametrize("size", SIZES)
def test_best_resolution_and_fit_match_transformers(size):
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    best = anyres.select_best_resolution(size, PINPOINTS)
    assert best == tuple(select_best_resolution(size, PINPOINTS))
    pixels = np.zeros((3, *size))
    assert anyres.fit_size(size, best) == get_patch_output_size(pixels, best, input_data_format="channels_first")


@pytest.mark.parametrize("size", SIZES)
def test_preprocess_anyres_matches_llava_next_processor(size):
    vision = ViTConfig(image_size=TILE, patch_size=8)
    image = photo(*size)
    ours = preprocess_anyres(image, vision, PINPOINTS)
    ref = next_processor(vision)(image, return_tensors="pt")
    rows, cols = anyres.tile_grid(size, PINPOINTS, TILE)
    assert ours.shape == (1 + rows * cols, 3, TILE, TILE)
    assert ref["image_sizes"].tolist() == [list(size)]
    theirs = ref["pixel_values"][0, : len(ours)]  # the processor zero-pads every image to the batch's most views
    assert (ours - theirs).abs().max().item() < 1e-5


def test_pinpoints_must_be_whole_tiles():
    anyres.check_pinpoints(PINPOINTS, TILE)
    with pytest.raises(ValueError, match=r"grid pinpoint \[32, 40\]"):
        anyres.check_pinpoints([[32, 64], [32, 40]], TILE)


# ----------------------------------------------------------------------------- LLaVA-NeXT end to end


@pytest.fixture(scope="module")
def llava_next_dir(hf_dir):
    cfg = transformers.LlavaNextConfig(vision_config=clip_vision_config(), text_config=llama_config(),
                                       image_token_index=VOCAB - 1, image_grid_pinpoints=PINPOINTS,
                                       vision_feature_layer=-2, vision_feature_select_strategy="default")
    return save(random_init(transformers.LlavaNextForConditionalGeneration(cfg), 21), hf_dir / "llava_next")


def converted_pair(cls, hf_model_dir, tmp_path_factory):
    """(transformers' model, ours converted from the same directory with --llava)."""
    out = tmp_path_factory.mktemp("ours") / "ckpt"
    convert("--llava", hf_model_dir, "--out", out)
    return load_hf(cls, hf_model_dir), VLM.from_pretrained(out)


def exported(ours, cls, tmp_path):
    """Ours saved, exported with --to-hf, and reloaded by transformers."""
    ours.save_pretrained(tmp_path / "ours")
    convert("--to-hf", tmp_path / "ours", "--out", tmp_path / "hf")
    return load_hf(cls, tmp_path / "hf")


@pytest.fixture(scope="module")
def next_pair(llava_next_dir, tmp_path_factory):
    return converted_pair(transformers.LlavaNextForConditionalGeneration, llava_next_dir, tmp_path_factory)


def next_inputs(model, sizes, seed=0):
    """One prompt holding an image of each (h, w) size: (input_ids, our pixels, transformers' processor output)."""
    images = [photo(*size, seed=seed + k) for k, size in enumerate(sizes)]
    cfg = model.cfg
    ids = image_prompt(0, cfg.image_token_id, n_text=3, seed=seed)
    for size in sizes:
        ids = torch.cat([ids, torch.full((1, cfg.image_tokens(size)), cfg.image_token_id),
                         image_prompt(0, cfg.image_token_id, n_text=4, seed=seed)[:, 1:]], dim=1)
    pixels = torch.cat([preprocess_anyres(im, cfg.vision, cfg.grid_pinpoints) for im in images])
    return ids, pixels, next_processor(cfg.vision, cfg.grid_pinpoints)(images, return_tensors="pt")


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES[:5] + [(20, 400)])
def test_llava_next_logits_and_greedy_tokens_match_transformers(next_pair, size):
    ref, ours = next_pair
    ids, pixels, hf = next_inputs(ours, [size])
    theirs = ref(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"]).logits
    logits, _ = ours(ids, pixels, image_sizes=hf["image_sizes"])
    assert rel_err(logits, theirs) < 1e-4
    want = ref.generate(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
                        max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.size(1):]
    assert torch.equal(ours.generate(ids, pixels, max_new_tokens=8, image_sizes=hf["image_sizes"]), want)


@torch.no_grad()
def test_llava_next_several_images_in_one_prompt_keep_their_order(next_pair):
    ref, ours = next_pair
    ids, pixels, hf = next_inputs(ours, [(40, 90), (300, 500), (37, 53)], seed=3)
    theirs = ref(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"]).logits
    assert rel_err(ours(ids, pixels, image_sizes=hf["image_sizes"])[0], theirs) < 1e-4


@torch.no_grad()
def test_llava_next_round_trip_reloads_in_transformers(next_pair, tmp_path):
    ref, ours = next_pair
    back = exported(ours, transformers.LlavaNextForConditionalGeneration, tmp_path)
    ids, _, hf = next_inputs(ours, [(90, 40), (50, 50)], seed=5)
    kw = dict(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"])
    assert rel_err(back(**kw).logits, ref(**kw).logits) < 1e-6


# ----------------------------------------------------------------------------- token counts through data.py


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(ShapesWorld().texts(200), 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def scratch(tok):
    """A from-scratch anyres model over the tokenizer's vocabulary (its own placeholder row at the end)."""
    vision = ViTConfig(image_size=TILE, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
    lm = LlamaConfig(vocab_size=tok.vocab_size + 2, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                     max_seq_len=1024)
    torch.manual_seed(0)
    return VLM(VLMConfig(vision, lm, image_token_id=tok.vocab_size, grid_pinpoints=PINPOINTS,
                         video_token_id=tok.vocab_size + 1)).eval()


def record(n_images: int, k=0) -> dict:
    question = "<image>\n" * n_images + "What color is the circle?"
    return {"id": f"r{k}", "conversations": [{"from": "human", "value": question},
                                             {"from": "gpt", "value": "red" + " and blue" * k}]}


def test_placeholders_views_and_model_agree_for_every_size(tok, scratch):
    cfg = scratch.cfg
    for size in SIZES:
        sample = encode_sample(record(1), [photo(*size)], tok, cfg, "vicuna_v1", None, "pad")
        rows, cols = anyres.tile_grid(size, PINPOINTS, TILE)
        assert int((sample["input_ids"] == cfg.image_token_id).sum()) == cfg.image_tokens(size)
        assert sample["pixel_values"].shape[0] == 1 + rows * cols and sample["image_sizes"].tolist() == [list(size)]
        assert len(scratch.image_features(sample["pixel_values"], sample["image_sizes"])) == cfg.image_tokens(size)


def test_max_len_cuts_the_grown_sequence_where_an_uncut_one_would_be_cut(tok, scratch):
    images = [photo(40, 90), photo(300, 500)]
    full = encode_sample(record(2), images, tok, scratch.cfg, "vicuna_v1", None, "pad")
    cut = encode_sample(record(2), images, tok, scratch.cfg, "vicuna_v1", len(full["input_ids"]) - 2, "pad")
    assert torch.equal(cut["input_ids"], full["input_ids"][:-2]) and torch.equal(cut["labels"], full["labels"][:-2])
    with pytest.raises(TooLong):
        encode_sample(record(2), images, tok, scratch.cfg, "vicuna_v1", scratch.cfg.image_tokens((40, 90)) + 5, "pad")


@torch.no_grad()
def test_packed_rows_of_mixed_sizes_have_the_loss_of_padded_rows(tok, scratch):
    sizes = [[(40, 90)], [(300, 500), (37, 53)], [(90, 40)], [(7, 11)]]  # one record holds two images
    samples = [encode_sample(record(len(s), k), [photo(*hw, seed=k) for hw in s], tok, scratch.cfg, "vicuna_v1",
                             None, "pad") for k, s in enumerate(sizes)]
    plain = collate(samples, tok.pad_id)
    packed = collate(samples, tok.pad_id, pack_len=2 * max(len(s["input_ids"]) for s in samples))
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    losses = [scratch(b["input_ids"], b["pixel_values"], labels=b["labels"], segment_ids=b["segment_ids"],
                      image_sizes=b["image_sizes"], num_tokens=b["num_tokens"])[1] for b in (plain, packed)]
    assert rel_err(losses[1], losses[0]) < 1e-5


# ----------------------------------------------------------------------------- LLaVA-OneVision: SigLIP + Qwen2


def onevision_processor(vision: ViTConfig, pinpoints=PINPOINTS):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    S = vision.image_size
    return LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=pinpoints,
                                           image_mean=list(vision.image_mean), image_std=list(vision.image_std))


@pytest.fixture(scope="module")
def onevision_dir(hf_dir):
    text = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # anyres_max_1: any map above one tile's tokens is shrunk, so the tiny model exercises the bilinear downscale
    cfg = transformers.LlavaOnevisionConfig(vision_config=siglip_vision_config(), text_config=text,
                                            image_token_index=VOCAB - 1, video_token_index=VOCAB - 2,
                                            image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1",
                                            vision_feature_layer=-1, vision_feature_select_strategy="full")
    return save(random_init(transformers.LlavaOnevisionForConditionalGeneration(cfg), 22), hf_dir / "onevision")


@pytest.fixture(scope="module")
def onevision_pair(onevision_dir, tmp_path_factory):
    return converted_pair(transformers.LlavaOnevisionForConditionalGeneration, onevision_dir, tmp_path_factory)


@pytest.mark.parametrize("size", SIZES)
def test_preprocess_anyres_matches_onevision_processor_for_single_images(size):
    vision = siglip_config(image_size=TILE, patch_size=8)
    image = photo(*size)
    ours = preprocess_anyres(image, vision, PINPOINTS)
    theirs = onevision_processor(vision)(image, return_tensors="pt")["pixel_values"][0, : len(ours)]
    assert (ours - theirs).abs().max().item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("size", [(40, 90), (90, 40), (37, 53), (300, 500)])
def test_onevision_image_logits_and_greedy_tokens_match_transformers(onevision_pair, size):
    ref, ours = onevision_pair
    assert ours.cfg.anyres_max == 1 and ours.cfg.lm.attn_bias and not ours.cfg.lm.proj_bias
    image = photo(*size)
    ids = image_prompt(ours.cfg.image_tokens(size), ours.cfg.image_token_id, vocab=VOCAB - 2)
    hf = onevision_processor(ours.cfg.vision)(image, return_tensors="pt")
    kw = dict(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"])
    pixels = preprocess_anyres(image, ours.cfg.vision, ours.cfg.grid_pinpoints)
    assert rel_err(ours(ids, pixels, image_sizes=hf["image_sizes"])[0], ref(**kw).logits) < 1e-4
    want = ref.generate(**kw, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, pixels, max_new_tokens=8, image_sizes=hf["image_sizes"]),
                       want[:, ids.size(1):])


@torch.no_grad()
def test_onevision_8_frame_video_logits_and_greedy_tokens_match_transformers(onevision_pair):
    ref, ours = onevision_pair
    frames = torch.randn(1, 8, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    assert ours.cfg.video_tokens(8) == 8 * 2 * 2 + 1  # a 4 x 4 patch grid pools to 2 x 2, one newline per video
    ids = image_prompt(ours.cfg.video_tokens(8), ours.cfg.video_token_id, vocab=VOCAB - 2)
    theirs = ref(input_ids=ids, pixel_values_videos=frames).logits
    assert rel_err(ours(ids, videos=frames)[0], theirs) < 1e-4
    want = ref.generate(input_ids=ids, pixel_values_videos=frames, max_new_tokens=8, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, videos=frames), want[:, ids.size(1):])


@torch.no_grad()
def test_onevision_round_trip_reloads_in_transformers(onevision_pair, tmp_path):
    ref, ours = onevision_pair
    back = exported(ours, transformers.LlavaOnevisionForConditionalGeneration, tmp_path)
    image = photo(300, 500)
    hf = onevision_processor(ours.cfg.vision)(image, return_tensors="pt")
    ids = image_prompt(ours.cfg.image_tokens((300, 500)), ours.cfg.image_token_id, vocab=VOCAB - 2)
    kw = dict(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"])
    assert rel_err(back(**kw).logits, ref(**kw).logits) < 1e-6


def onevision_placeholders(hf_images, k: int, grid: int) -> int:
    """How many placeholders transformers' OneVision processor writes for image k of a processed batch (its own
    replace_image_token; the processor itself cannot be built without torchvision, for its video half)."""
    from transformers import LlavaOnevisionProcessor

    ns = SimpleNamespace(num_image_tokens=grid**2, vision_feature_select_strategy="full", image_token="<image>")
    return LlavaOnevisionProcessor.replace_image_token(ns, hf_images, k).count("<image>")


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[(40, 90), (300, 500)], [(90, 40), (37, 53), (50, 50)]])
def test_onevision_multi_image_prompt_shows_each_image_untiled_as_transformers(onevision_pair, tok, sizes):
    """transformers' OneVision tiles only a sample's lone image: several get one mean-padded view + one newline."""
    ref, ours = onevision_pair
    cfg = ours.cfg
    assert not cfg.multi_image_tiles and not cfg.tiles(len(sizes)) and cfg.tiles(1)
    images = [photo(*size, seed=k) for k, size in enumerate(sizes)]
    hf = onevision_processor(cfg.vision)([images], return_tensors="pt")  # one sample holding every image
    assert hf["batch_num_images"].tolist() == [len(images)]
    counts = [onevision_placeholders(hf, k, cfg.vision.grid) for k in range(len(images))]
    assert counts == [cfg.image_tokens(size, tiled=False) for size in sizes] == [cfg.vision.grid**2 + 1] * len(sizes)
    ids = image_prompt(0, cfg.image_token_id, n_text=3, vocab=VOCAB - 2)
    for k, count in enumerate(counts):
        ids = torch.cat([ids, torch.full((1, count), cfg.image_token_id), torch.tensor([[5 + k, 9 + k]])], dim=1)
    pixels = sample.pixels(ours, images)  # (images, 3, S, S): one view each
    theirs = hf["pixel_values"][:, 0]  # the processor zero-pads each image's views to the batch's most
    assert pixels.shape == theirs.shape and (pixels - theirs).abs().max().item() < 1e-5
    tiled = sample.image_tiled(ours, images)
    kw = dict(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
              batch_num_images=hf["batch_num_images"])
    logits, _ = ours(ids, pixels, image_sizes=hf["image_sizes"], image_tiled=tiled)
    assert rel_err(logits, ref(**kw).logits) < 1e-4
    want = ref.generate(**kw, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = ours.generate(ids, pixels, max_new_tokens=8, image_sizes=hf["image_sizes"], image_tiled=tiled)
    assert torch.equal(got, want[:, ids.size(1):])
    # the same record through data.py: placeholders, collate and the model agree (a lone image is still tiled)
    one_cfg = scratch_like(tok, cfg)
    samples = [encode_sample(record(len(images), 0), images, tok, one_cfg, "vicuna_v1", None, "pad"),
               encode_sample(record(1, 1), images[:1], tok, one_cfg, "vicuna_v1", None, "pad")]
    batch = collate(samples, tok.pad_id)
    assert batch["image_tiled"].tolist() == [False] * len(images) + [True]
    n_slots = int((batch["input_ids"] == one_cfg.image_token_id).sum())
    want_slots = len(images) * (one_cfg.vision.grid**2 + 1) + one_cfg.image_tokens(sizes[0])
    assert n_slots == want_slots
    model = VLM(one_cfg).eval()
    features = model.image_features(batch["pixel_values"], batch["image_sizes"], batch["image_tiled"])
    assert len(features) == n_slots
    model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"], image_sizes=batch["image_sizes"],
          image_tiled=batch["image_tiled"])  # the splice accepts the batch (it checks the counts)


def scratch_like(tok, cfg: VLMConfig) -> VLMConfig:
    """A small model over the tokenizer's vocabulary with cfg's vision and anyres settings (OneVision's rules)."""
    lm = LlamaConfig(vocab_size=tok.vocab_size + 2, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96,
                     max_seq_len=2048)
    return dataclasses.replace(cfg, lm=lm, image_token_id=tok.vocab_size, video_token_id=tok.vocab_size + 1)


def test_pool_frames_matches_onevision_on_an_odd_grid():
    """At an even grid, bilinear 2x pooling equals a 2x2 mean; an odd grid (SigLIP-384/14 has 27) tells them apart."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    tower = SimpleNamespace(vision_config=SimpleNamespace(image_size=40, patch_size=8))  # a 5 x 5 grid
    features = torch.randn(3, 25, 6, generator=torch.Generator().manual_seed(0))
    want = LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=tower), features)
    assert want.shape == (3, 9, 6) and torch.allclose(anyres.pool_frames(features), want, atol=1e-6)


# ----------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def scratch_dir(scratch, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("scratch") / "ckpt"
    scratch.save_pretrained(out, tok)
    return out


def reference_answer(model, tok, ids, **visual) -> str:
    """What VLM.generate answers for these prompt ids, decoded as sample.py decodes."""
    tokens = model.generate(torch.tensor([ids]), max_new_tokens=6, eos_id=tok.stop_ids, **visual)
    return sample.answer_text(tok, tokens[0].tolist())


def test_sample_cli_tiles_an_image_for_an_anyres_checkpoint(scratch, scratch_dir, tok, tmp_path, capsys):
    path = tmp_path / "wide.png"
    photo(300, 500).save(path)
    sample.main(["--checkpoint", str(scratch_dir), "--image", str(path), "--prompt", "Describe it.",
                 "--max-new-tokens", "6"])
    text = build_prompt([{"from": "human", "value": "<image>\nDescribe it."}], scratch.cfg.template, tok)
    ids = tokenize_prompt(tok, text, scratch.cfg.image_token_id, scratch.cfg.image_tokens((300, 500)))
    pixels = preprocess_anyres(Image.open(path).convert("RGB"), scratch.cfg.vision, PINPOINTS)
    want = reference_answer(scratch, tok, ids, pixel_values=pixels, image_sizes=[(300, 500)])
    assert want.strip() and capsys.readouterr().out == want + "\n"
    assert torch.equal(sample.pixels(scratch, [Image.open(path).convert("RGB")]), pixels)
    assert sample.encode(tok, scratch, text, scratch.cfg.template, sizes=[(300, 500)]) == ids


def test_sample_cli_reads_a_video_as_frames(scratch, scratch_dir, tok, tmp_path, capsys):
    path = tmp_path / "clip.gif"
    first, *rest = [photo(40, 56, seed=k) for k in range(10)]
    first.save(path, save_all=True, append_images=rest)
    sample.main(["--checkpoint", str(scratch_dir), "--video", str(path), "--frames", "4", "--prompt",
                 "What happens?", "--max-new-tokens", "6"])
    text = build_prompt([{"from": "human", "value": "<image>\nWhat happens?"}], scratch.cfg.template, tok)
    ids = tokenize_prompt(tok, text, scratch.cfg.video_token_id, scratch.cfg.video_tokens(4))
    frames = preprocess_video(read_video(path, 4), scratch.cfg.vision)[None]  # (1, 4, 3, S, S)
    want = reference_answer(scratch, tok, ids, videos=frames)
    assert want.strip() and capsys.readouterr().out == want + "\n"
    # a random model's few greedy tokens barely depend on the frames, so the pieces are pinned one by one too
    assert torch.equal(sample.load_video(scratch, path, 4), frames)
    assert sample.encode(tok, scratch, text, scratch.cfg.template, frames=4) == ids


def test_sample_cli_refuses_a_bad_video_in_one_line(scratch_dir, tmp_path):
    path = tmp_path / "short.gif"
    photo(40, 56).save(path)
    with pytest.raises(SystemExit, match=r"error: .*short\.gif: has 1 frames, fewer than the 8 asked"):
        sample.main(["--checkpoint", str(scratch_dir), "--video", str(path)])


def test_a_40000_by_200_image_tiles_in_bounded_memory_and_keeps_its_base_view(tok, scratch):
    from convert_weights import LLAVA_NEXT_PINPOINTS

    image = photo(200, 40000)
    vision = ViTConfig(image_size=336, patch_size=14)  # real LLaVA-NeXT tiles: the image fits a 336 x 1008 canvas
    ours = preprocess_anyres(image, vision, LLAVA_NEXT_PINPOINTS)
    theirs = next_processor(vision, LLAVA_NEXT_PINPOINTS)(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (4, 3, 336, 336) and (ours - theirs).abs().max().item() < 1e-5
    # resized into the canvas the strip is 5 pixels high, less than one patch row: unpad keeps no row of the tiles,
    # only the base view's 24 x 24 tokens (as in transformers)
    assert anyres.num_tokens((200, 40000), LLAVA_NEXT_PINPOINTS, 336, 24) == 24 * 24
    sample_ = encode_sample(record(1), [image], tok, scratch.cfg, "vicuna_v1", None, "pad")  # tiny 32 px tiles
    assert int((sample_["input_ids"] == scratch.cfg.image_token_id).sum()) == scratch.cfg.vision.grid**2
    assert scratch.image_features(sample_["pixel_values"], sample_["image_sizes"]).shape[0] == 16


@torch.no_grad()
def test_llava_records_with_video_encode_or_are_skipped_with_their_reason(tok, scratch, tmp_path):
    clip = [photo(40, 56, seed=k) for k in range(10)]
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:])
    clip[0].save(tmp_path / "short.gif", save_all=True, append_images=clip[1:3])
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    photo(300, 500).save(tmp_path / "wide.png")
    turns = [{"from": "human", "value": "What happens?\n<image>"}, {"from": "gpt", "value": "red"}]
    records = [{"id": "v", "video": "clip.gif", "conversations": turns},
               {"id": "i", "image": "wide.png", "conversations": turns},
               {"id": "short", "video": "short.gif", "conversations": turns},
               {"id": "broken", "video": "broken.mp4", "conversations": turns},
               {"id": "gone", "video": "gone.mp4", "conversations": turns},
               {"id": "both", "video": "clip.gif", "image": "wide.png", "conversations": turns}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = LlavaDataset(tmp_path / "data.json", None, tok, scratch.cfg, frames=4)
    samples = [dataset[i] for i in range(len(dataset))]
    assert dataset.skip_report() == ("skipped 4 of 6 records: 2 unreadable video, 1 image/tag count mismatch, "
                                     "1 missing video")
    video, image = samples[0], samples[1]
    assert video["videos"].shape == (1, 4, 3, TILE, TILE) and video["pixel_values"] is None
    assert int((video["input_ids"] == scratch.cfg.video_token_id).sum()) == scratch.cfg.video_tokens(4)
    assert dataset.records[0]["conversations"][0]["value"] == "<image>\nWhat happens?"  # the tag goes first
    batch = collate(samples, tok.pad_id)
    _, loss = scratch(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                      image_sizes=batch["image_sizes"], videos=batch["videos"])
    alone = [scratch(s["input_ids"][None], s["pixel_values"], labels=s["labels"][None],
                     image_sizes=s["image_sizes"], videos=s["videos"], num_tokens=batch["num_tokens"])[1]
             for s in (video, image)]
    assert rel_err(loss, sum(alone)) < 1e-5


@torch.no_grad()
def test_records_mixing_images_and_videos_splice_each_in_tag_order(tok, scratch, tmp_path):
    """LLaVA-OneVision's data mixes images (<image>) and videos (<video>) in one conversation; bad media are
    counted skips naming their kind."""
    clips = [[photo(40, 56, seed=10 * v + k) for k in range(6)] for v in range(2)]
    for v, clip in enumerate(clips):
        clip[0].save(tmp_path / f"clip{v}.gif", save_all=True, append_images=clip[1:])
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    for k, size in enumerate([(40, 90), (300, 500)]):
        photo(*size, seed=k).save(tmp_path / f"im{k}.png")
    question = "Compare <image> with <video>, then <video> and <image>."
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "blue"}]
    mixed = {"image": ["im0.png", "im1.png"], "video": ["clip0.gif", "clip1.gif"], "conversations": turns}
    records = [mixed | {"id": "mixed"}, mixed | {"id": "broken", "video": ["clip0.gif", "broken.mp4"]},
               mixed | {"id": "gone", "image": ["im0.png", "gone.png"]}, mixed | {"id": "few", "video": "clip0.gif"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = LlavaDataset(tmp_path / "data.json", None, tok, scratch.cfg, frames=3)
    sample_, *_ = [dataset[i] for i in range(len(dataset))]
    assert dataset.skip_report() == (
        "skipped 3 of 4 records: 1 image/tag count mismatch, 1 unreadable video, 1 missing image")
    assert dataset.records[0]["media"] == ["image", "video", "video", "image"]
    cfg, ids = scratch.cfg, sample_["input_ids"]
    assert sample_["videos"].shape == (2, 3, 3, TILE, TILE) and sample_["image_tiled"].tolist() == [True, True]
    # the blocks follow the tags: image 0, video 0, video 1, image 1 (runs of one placeholder id, in order)
    runs = [(int(t), len(list(g))) for t, g in itertools.groupby(ids.tolist())
            if int(t) in (cfg.image_token_id, cfg.video_token_id)]
    video = (cfg.video_token_id, cfg.video_tokens(3))
    assert runs == [(cfg.image_token_id, cfg.image_tokens((40, 90))), video, video,
                    (cfg.image_token_id, cfg.image_tokens((300, 500)))]
    assert sample_["labels"][ids == cfg.video_token_id].eq(-100).all()
    batch = collate([sample_], tok.pad_id)
    x = scratch.embed(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["videos"],
                      batch["image_tiled"])[0]
    assert torch.equal(x[ids == cfg.video_token_id], scratch.video_features(sample_["videos"]))
    assert torch.equal(x[ids == cfg.image_token_id],
                       scratch.image_features(sample_["pixel_values"], sample_["image_sizes"]))
    frames = [preprocess_video(read_video(tmp_path / f"clip{v}.gif", 3), cfg.vision) for v in range(2)]
    assert torch.equal(sample_["videos"], torch.stack(frames))


def test_train_frames_flag_sets_the_frames_read_per_video(tok, scratch, tmp_path):
    import train

    clip = [photo(40, 56, seed=k) for k in range(5)]
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:])
    turns = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "data.json").write_text(json.dumps([{"id": "v", "video": "clip.gif", "conversations": turns}]))
    for frames, want in [(4, (1, 4, 3, TILE, TILE)), (6, None)]:  # the gif has 5 frames: 6 is a counted skip
        args = train.parse_args(["--stage", "finetune", "--init", "tiny", "--data", str(tmp_path / "data.json"),
                                 "--frames", str(frames)])
        args.max_len, args.template = 1024, "vicuna_v1"  # what train() fills in from the model
        dataset, _, _ = train.build_dataset(args, tok, scratch)
        got = dataset[0]
        assert got.reason == "unreadable video" if want is None else got["videos"].shape == want
    with pytest.raises(SystemExit):
        train.parse_args(["--frames", "0"])


@torch.no_grad()
def test_attention_map_draws_the_tile_map_back_onto_the_image(scratch, scratch_dir, tok, tmp_path, capsys):
    path, out = tmp_path / "wide.png", tmp_path / "attn.png"
    photo(300, 500).save(path)
    sample.main(["--checkpoint", str(scratch_dir), "--image", str(path), "--prompt", "Describe it.",
                 "--max-new-tokens", "6", "--attention-map", str(out)])
    assert abs(Image.open(out).width / Image.open(out).height - 500 / 300) < 0.01
    assert (tmp_path / "attn_tokens.png").is_file()
    cfg = scratch.cfg
    text = build_prompt([{"from": "human", "value": "<image>\nDescribe it."}], cfg.template, tok)
    ids = tokenize_prompt(tok, text, cfg.image_token_id, cfg.image_tokens((300, 500)))
    px, sizes = sample.pixels(scratch, [Image.open(path).convert("RGB")]), torch.tensor([[300, 500]])
    answer = scratch.generate(torch.tensor([ids]), px, max_new_tokens=6, image_sizes=sizes)[0].tolist()
    (heat,) = sample.attention_to_tiles(scratch, ids, px, answer, [0, 1], sizes)
    rows, cols = anyres.feature_shape((300, 500), PINPOINTS, TILE, cfg.vision.grid)
    assert heat.shape == (len(answer), rows, cols)
    att = sample.answer_attention(scratch, ids, px, answer, [0, 1], sizes)  # (n, base 16 + rows * (cols + 1))
    first_row, last_row = att[:, 16 : 16 + cols], att[:, 16 + (rows - 1) * (cols + 1) : -1]  # newlines left out
    assert torch.equal(heat[:, 0], first_row) and torch.equal(heat[:, -1], last_row)


@torch.no_grad()
def test_eval_batches_images_of_different_sizes_like_one_at_a_time(scratch, tok):
    import eval as evaluate

    records = [{"id": str(k), "images": [photo(*size, seed=k)], "conversations": record(1)["conversations"]}
               for k, size in enumerate([(40, 90), (300, 500), (37, 53)])]
    batched = evaluate.evaluate_qa(scratch, tok, records, batch_size=3, max_new_tokens=5)["predictions"]
    alone = [evaluate.evaluate_qa(scratch, tok, [r], batch_size=1, max_new_tokens=5)["predictions"][0]
             for r in records]
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in alone]
    assert any(p["prediction"] for p in alone), "empty answers would prove little"


def test_sample_encode_needs_sizes_only_with_anyres(scratch, tok):
    text = build_prompt([{"from": "human", "value": "<image>\nDescribe it."}], scratch.cfg.template, tok)
    with pytest.raises(ValueError, match=r"needs its \(height, width\)"):
        sample.encode(tok, scratch, text, scratch.cfg.template)
    plain = VLM(dataclasses.replace(scratch.cfg, grid_pinpoints=[], video_token_id=None))
    ids = sample.encode(tok, plain, text, plain.cfg.template)  # as the tutorial calls it
    assert ids.count(plain.cfg.image_token_id) == plain.cfg.num_image_tokens == 16


# ----------------------------------------------------------------------------- ShapesWorld learns it


def centre(image: Image.Image, color: str):
    """(x, y) mean position of the pixels within 30 levels of a palette colour, or None when there are none."""
    from data import PALETTE

    pixels = np.asarray(image, dtype=np.int16)
    ys, xs = np.nonzero((np.abs(pixels - PALETTE[color]) < 30).all(-1))
    return (xs.mean(), ys.mean()) if len(xs) else None


def test_shapes_clips_move_each_object_its_way_and_the_last_one_enters_late():
    world = ShapesWorld(image_size=64, grid=2, max_objects=2, frames=4, texture=0)
    asked, measured = set(), 0
    for i in range(40):
        record, objects = world.record(i, split="test"), world.scene(i, "test")
        assert len(record["video"]) == 4 and record == world.record(i, split="test") | {"video": record["video"]}
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        asked.add(record["category"])
        if record["category"] == "motion":
            o = next(o for o in objects if f"the {o.color} {o.shape} moving" in question)
            if [p.color for p in objects].count(o.color) > 1 or centre(record["video"][-2], o.color) is None:
                continue  # a shared colour (or an object that enters last) hides its own drift
            (x0, y0), (x1, y1) = centre(record["video"][-2], o.color), centre(record["video"][-1], o.color)
            measured += 1
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[answer]
            assert (x1 - x0) * dx + (y1 - y0) * dy > 2 and abs((x1 - x0) * dy) + abs((y1 - y0) * dx) < 0.5
        else:
            color, shape = answer.split()
            assert question == "<image>\nWhich object appears last?" and any(
                (o.color, o.shape) == (color, shape) for o in objects)
            if [o.color for o in objects].count(color) == 1:
                assert centre(record["video"][0], color) is None and centre(record["video"][-1], color) is not None
    assert asked == {"motion", "last"} and measured >= 10


def test_shapes_clip_captions_say_where_each_object_moves_and_which_appears_last():
    world = ShapesWorld(image_size=64, grid=2, max_objects=2, frames=4, texture=0)
    measured = lasts = 0
    for i in range(40):
        record, objects = world.record(i, task="caption", split="test"), world.scene(i, "test")
        assert record["category"] == "caption" and record["video"] == world.record(i, split="test")["video"]
        caption, video = record["conversations"][1]["value"], record["video"]
        colors = [o.color for o in objects]
        for o in objects:
            move = re.search(rf"a {o.size} {o.color} {o.shape} [a-z ]+? moving (\w+)", caption).group(1)
            if colors.count(o.color) > 1 or centre(video[-2], o.color) is None:
                continue
            (x0, y0), (x1, y1) = centre(video[-2], o.color), centre(video[-1], o.color)
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[move]
            assert (x1 - x0) * dx + (y1 - y0) * dy > 2
            measured += 1
        if len(objects) == 2 and colors[0] != colors[1]:  # the one missing from the first frame comes last
            late = next(o for o in objects if centre(video[0], o.color) is None)
            assert re.search(rf" and then a {late.size} {late.color} {late.shape} [a-z ]+ moving \w+$", caption)
            lasts += 1
    assert measured >= 20 and lasts >= 5
    with pytest.raises(ValueError, match="unknown task"):
        world.record(0, task="story")


def test_small_objects_shrink_with_object_scale():
    big, small = ShapesWorld(image_size=64, grid=2), ShapesWorld(image_size=64, grid=2, object_scale=0.3)
    assert [o.r * 0.3 for o in big.scene(3)] == pytest.approx([o.r for o in small.scene(3)])
    with pytest.raises(ValueError, match="object_scale"):
        ShapesWorld(object_scale=0)


@torch.no_grad()
def test_eval_scores_clips_and_blinds_their_frames(tok, scratch):
    import eval as evaluate

    world = ShapesWorld(image_size=40, grid=2, max_objects=2, frames=3)
    records = evaluate.shapes_records(3, world)
    assert all(not r["images"] and len(r["videos"]) == 1 for r in records)
    batched = evaluate.evaluate_qa(scratch, tok, records, batch_size=3, max_new_tokens=6)["predictions"]
    blind = evaluate.evaluate_qa(scratch, tok, records, batch_size=3, max_new_tokens=6, blind=True)["predictions"]
    cfg = scratch.cfg
    for k, record in enumerate(records):
        prompt = evaluate.question_prompt(record["conversations"], cfg.template, None, tok)[0]
        ids = tokenize_prompt(tok, prompt, cfg.video_token_id, cfg.video_tokens(3))
        frames = preprocess_video(record["videos"][0], cfg.vision)[None]
        want = [reference_answer(scratch, tok, ids, videos=v).strip() for v in (frames, torch.zeros_like(frames))]
        assert [batched[k]["prediction"], blind[k]["prediction"]] == want


@pytest.mark.parametrize("sweep", ["anyres", "video"])
def test_experiments_media_sweeps_run_end_to_end(sweep, tmp_path, monkeypatch):
    import experiments

    monkeypatch.chdir(tmp_path)  # train.py writes nothing outside --out, but keep the checkout clean anyway
    experiments.main([sweep, "--smoke", "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "work")])
    rows = json.loads((tmp_path / "docs" / f"{sweep}.json").read_text())
    assert list(rows) == list(experiments.MEDIA[sweep]) and (tmp_path / "docs" / f"{sweep}.png").is_file()
    run = next((tmp_path / "work" / sweep).glob("*/seed_1337"))
    cfg = VLMConfig.from_dict(json.loads((run / "finetune" / "config.json").read_text()))
    assert json.loads((run / "pretrain" / "training.json").read_text())["stage"] == "pretrain"  # a caption stage
    if sweep == "video":  # 3x3 patches per frame pooled to 2x2
        assert cfg.video_token_id == cfg.lm.vocab_size - 1 and rows[next(iter(rows))]["image_tokens"] == 4 * 4 + 1
    else:  # the base view's 3x3, then a 6x6 map of 2x2 tiles with a newline per row
        assert [row["image_tokens"] for row in rows.values()] == [9, 9 + 6 * 7]


@pytest.mark.slow  # ~15 s of forwards at the small preset's size
def test_bench_anyres_reports_tokens_per_size_and_a_video_matching_transformers(tmp_path):
    import bench
    from model import preset

    bench.main(["--what", "anyres", "--repeats", "1", "--warmup", "0", "--text-tokens", "4", "--json",
                str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    cfg = preset("small")
    S = cfg.vision.image_size
    tiled = dataclasses.replace(cfg, grid_pinpoints=[[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]])
    for h, w in bench.ANYRES_SIZES:
        row = report["anyres"][f"{w} x {h}"]
        assert (row["base_tokens"], row["anyres_tokens"]) == (cfg.num_image_tokens, tiled.image_tokens((h, w)))
    assert report["video"]["tokens"] == 16 * 4 * 4 + 1 and report["video"]["max_rel_err"] < 1e-4  # 8x8 grid pooled


def test_shapes_world_keeps_its_own_image_size_when_set():
    import train

    assert train.shapes_world(train.parse_args([]), 32).image_size == 32  # drawn at the tower's size by default
    assert train.shapes_world(train.parse_args(["--set", "world.image_size=64"]), 32).image_size == 64  # tiled
