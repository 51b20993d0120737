"""model.py: the full LLaVA forward, loss and generation against transformers, plus checkpoint I/O."""

import dataclasses
import json

import pytest
import torch
from conftest import IMAGE_SIZE, convert, image_prompt, load_hf, rel_err, transformers
from safetensors.torch import load_file, save_file

from model import VLM, preset
from projector import ProjectorConfig


@pytest.fixture(scope="module")
def converted(llava_clip_dir, llava_siglip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours")
    convert("--llava", llava_clip_dir, "--out", out / "clip")
    convert("--llava", llava_siglip_dir, "--out", out / "siglip")
    return {"clip": (VLM.from_pretrained(out / "clip").eval(), llava_clip_dir, out / "clip"),
            "siglip": (VLM.from_pretrained(out / "siglip").eval(), llava_siglip_dir, out / "siglip")}


def images(n=1, seed=0):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_llava_logits_with_images_match_transformers(tower, converted):
    ours, hf_dir, _ = converted[tower]
    ref = load_hf(transformers.LlavaForConditionalGeneration, hf_dir)
    ids = torch.cat([image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id, seed=s) for s in (0, 1)])
    px = images(2)
    assert ours.cfg.num_image_tokens == (16 if tower == "clip" else 16)
    assert rel_err(ours(ids, px)[0], ref(input_ids=ids, pixel_values=px).logits) < 1e-4


@torch.no_grad()
def test_two_images_in_one_prompt_match_transformers(converted):
    ours, hf_dir, _ = converted["clip"]
    n, img = ours.cfg.num_image_tokens, ours.cfg.image_token_id
    first = image_prompt(n, img, seed=0)
    ids = torch.cat([first, torch.full((1, n), img), torch.tensor([[5, 6, 7]])], dim=1)
    px = images(2)
    ref = load_hf(transformers.LlavaForConditionalGeneration, hf_dir)
    assert rel_err(ours(ids, px)[0], ref(input_ids=ids, pixel_values=px).logits) < 1e-4


@torch.no_grad()
def test_loss_matches_transformers_and_normalises_by_num_tokens(converted):
    ours, hf_dir, _ = converted["clip"]
    ref = load_hf(transformers.LlavaForConditionalGeneration, hf_dir)
    ids = torch.cat([image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id, seed=s) for s in (0, 1)])
    labels = ids.clone()
    labels[:, : ours.cfg.num_image_tokens + 3] = -100
    labels[1, -2:] = -100
    px = images(2)
    _, loss = ours(ids, px, labels=labels)
    want = ref(input_ids=ids, pixel_values=px, labels=labels).loss
    assert rel_err(loss, want) < 1e-5
    n_supervised = int((labels[:, 1:] != -100).sum())
    _, summed = ours(ids, px, labels=labels, num_tokens=1)
    assert rel_err(summed, want * n_supervised) < 1e-5


@torch.no_grad()
def test_grounding_loss_is_minus_log_attention_on_the_named_tokens(converted):
    """With ground pairs the loss adds -log(attention paid by head 0 of every layer but the first, from each
    grounded query to its image keys, summed over keys), averaged over layers, plus the same of the first layer's
    head 0 for word keys (kind 1); transformers' attention weights are the oracle. Weight 0 leaves the plain loss
    untouched."""
    ours, hf_dir, _ = converted["clip"]
    ref = load_hf(transformers.LlavaForConditionalGeneration, hf_dir)
    ids = torch.cat([image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id, seed=s) for s in (0, 1)])
    labels = ids.clone()
    labels[:, : ours.cfg.num_image_tokens + 3] = -100
    image, T = 1, ids.size(1)  # the image block starts after BOS
    ground = torch.tensor([[0, T - 3, image, 0], [0, T - 3, image + 2, 0], [1, T - 2, 0, 0], [1, T - 4, image + 1, 0],
                           [0, T - 3, T - 5, 1], [0, T - 3, T - 4, 1], [1, T - 2, T - 3, 1]])
    px = images(2)
    _, plain = ours(ids, px, labels=labels)
    _, off = ours(ids, px, labels=labels, ground=ground, ground_weight=0.0)
    _, grounded = ours(ids, px, labels=labels, ground=ground, ground_weight=0.5)
    att = ref(input_ids=ids, pixel_values=px, output_attentions=True).attentions  # per layer (B, nh, T, T)
    want = sum(-(a[0, 0, T - 3, image] + a[0, 0, T - 3, image + 2]).log() - a[1, 0, T - 2, 0].log()
               - a[1, 0, T - 4, image + 1].log() for a in att[1:]) / (len(att) - 1)
    want = want - (att[0][0, 0, T - 3, T - 5] + att[0][0, 0, T - 3, T - 4]).log() - att[0][1, 0, T - 2, T - 3].log()
    assert len(att) >= 2 and torch.equal(off, plain)
    assert rel_err(grounded - plain, 0.5 * want) < 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers(converted):
    ours, hf_dir, _ = converted["clip"]
    assert not ours.cfg.lm.tie_embeddings
    ref = load_hf(transformers.LlavaForConditionalGeneration, hf_dir)
    ids = image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id)
    px = images()
    want = ref.generate(input_ids=ids, pixel_values=px, max_new_tokens=16, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[:, ids.size(1):]
    got = ours.generate(ids, px, max_new_tokens=16)
    assert got.shape == (1, 16)
    assert len(set(want[0].tolist())) > 3, "degenerate reference: the test would prove little"
    assert torch.equal(got, want)


def pad_batch(prompts, side, pad_id=0):
    T = max(p.size(1) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        span = slice(T - p.size(1), T) if side == "left" else slice(0, p.size(1))
        ids[i, span], mask[i, span] = p[0], True
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_generation_with_padding_equals_one_by_one(side, converted):
    ours, _, _ = converted["clip"]
    n, img = ours.cfg.num_image_tokens, ours.cfg.image_token_id
    prompts = [image_prompt(n, img, n_text=k, seed=k) for k in (2, 9, 5)]
    px = images(3)
    alone = [ours.generate(p, px[i : i + 1], max_new_tokens=12) for i, p in enumerate(prompts)]
    ids, mask = pad_batch(prompts, side)
    batched = ours.generate(ids, px, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(batched, torch.cat(alone))


@torch.no_grad()
def test_generation_stops_per_sequence_at_eos(converted):
    ours, _, _ = converted["clip"]
    n, img = ours.cfg.num_image_tokens, ours.cfg.image_token_id
    prompts = [image_prompt(n, img, n_text=k, seed=k) for k in (2, 9)]
    ids, mask = pad_batch(prompts, "left")
    free = ours.generate(ids, images(2), max_new_tokens=12, attention_mask=mask)
    eos = int(free[0, 3])  # pretend row 0's fourth token is EOS
    stopped = ours.generate(ids, images(2), max_new_tokens=12, attention_mask=mask, eos_id=eos)
    first = (free[0] == eos).nonzero()[0].item()
    assert torch.equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first:] == eos).all()
    row1_end = (free[1] == eos).nonzero()
    expected_len = 12 if len(row1_end) == 0 else max(first, row1_end[0].item()) + 1
    assert stopped.size(1) == expected_len  # stops as soon as every row is done


@torch.no_grad()
def test_generation_stops_each_row_at_any_of_several_stop_ids(converted):
    """A tokenizer's stop_ids (eos and the end of turn): a row ends at whichever comes first, then repeats the
    first stop id."""
    ours, _, _ = converted["clip"]
    n, img = ours.cfg.num_image_tokens, ours.cfg.image_token_id
    ids, mask = pad_batch([image_prompt(n, img, n_text=k, seed=k) for k in (2, 9)], "left")
    free = ours.generate(ids, images(2), max_new_tokens=12, attention_mask=mask)
    stops = [int(free[0, 2]), int(free[1, 4])]  # row 0 meets the first at step 2, row 1 the second at step 4
    stopped = ours.generate(ids, images(2), max_new_tokens=12, attention_mask=mask, eos_id=stops)
    for row in range(2):
        end = next(k for k, t in enumerate(free[row].tolist()) if t in stops)
        assert torch.equal(stopped[row, : end + 1], free[row, : end + 1])
        assert (stopped[row, end + 1 :] == stops[0]).all()


@torch.no_grad()
def test_sampling_is_reproducible_with_a_generator_and_respects_top_k(converted):
    ours, _, _ = converted["clip"]
    ids = image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id)
    run = lambda seed, **kw: ours.generate(ids, images(), max_new_tokens=10, temperature=1.0,
                                           generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0), run(0))
    assert torch.equal(run(0, top_k=1), ours.generate(ids, images(), max_new_tokens=10))  # top-1 is greedy
    assert torch.equal(run(3, top_p=1e-6), ours.generate(ids, images(), max_new_tokens=10))


def test_placeholder_image_mismatch_is_a_clear_error(converted):
    ours, _, _ = converted["clip"]
    ids = image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id)
    with pytest.raises(ValueError, match="16 image placeholder tokens, but 2 images give 32 image features"):
        ours(ids, images(2))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_save_load_round_trip_and_wrong_shape_names_the_key(converted, tmp_path):
    ours, _, _ = converted["clip"]
    ours.save_pretrained(tmp_path / "a")
    again = VLM.from_pretrained(tmp_path / "a")
    ids = image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id)
    with torch.no_grad():
        assert torch.equal(again(ids, images())[0], ours(ids, images())[0])
    state = load_file(tmp_path / "a" / "model.safetensors")
    state["lm.blocks.1.mlp.down.weight"] = state["lm.blocks.1.mlp.down.weight"][:, :-1].contiguous()
    save_file(state, tmp_path / "a" / "model.safetensors")
    shapes = r"'lm.blocks.1.mlp.down.weight' has shape \(64, 95\), model expects \(64, 96\)"
    with pytest.raises(ValueError, match=shapes):
        VLM.from_pretrained(tmp_path / "a")
    del state["lm.blocks.1.mlp.down.weight"]
    save_file(state, tmp_path / "a" / "model.safetensors")
    with pytest.raises(KeyError, match="missing tensor 'lm.blocks.1.mlp.down.weight'"):
        VLM.from_pretrained(tmp_path / "a")


def test_tied_model_round_trip_keeps_one_shared_table(tmp_path):
    torch.manual_seed(0)
    model = VLM(preset("tiny"))
    assert model.cfg.lm.tie_embeddings
    model.save_pretrained(tmp_path)
    again = VLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert again.lm.head.weight is again.lm.tok_embed.weight
    assert again.lm.head.weight.dtype == torch.bfloat16
    assert torch.equal(again.lm.tok_embed.weight.float(), model.lm.tok_embed.weight.bfloat16().float())


@torch.no_grad()
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_to_hf_export_loads_in_transformers_with_equal_logits(tower, converted, tmp_path):
    ours, _, ckpt = converted[tower]
    convert("--to-hf", ckpt, "--out", tmp_path / "hf")
    ref = load_hf(transformers.LlavaForConditionalGeneration, tmp_path / "hf")
    ids = image_prompt(ours.cfg.num_image_tokens, ours.cfg.image_token_id)
    assert rel_err(ours(ids, images())[0], ref(input_ids=ids, pixel_values=images()).logits) < 1e-4


@torch.no_grad()
def test_to_hf_export_of_the_tiny_from_scratch_model(tmp_path):
    """Tied head, our own image size, a SigLIP-style tower: models trained here can be served by transformers."""
    torch.manual_seed(0)
    model = VLM(preset("tiny")).eval()
    model.save_pretrained(tmp_path / "ours")
    convert("--to-hf", tmp_path / "ours", "--out", tmp_path / "hf")
    ref = load_hf(transformers.LlavaForConditionalGeneration, tmp_path / "hf")
    cfg = model.cfg
    ids = image_prompt(cfg.num_image_tokens, cfg.image_token_id, vocab=cfg.lm.vocab_size - 1)
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert rel_err(model(ids, px)[0], ref(input_ids=ids, pixel_values=px).logits) < 1e-4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["tie_word_embeddings"]


def test_to_hf_refuses_what_transformers_llava_cannot_hold(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), projector=ProjectorConfig("linear"))
    VLM(cfg).save_pretrained(tmp_path / "linear")
    with pytest.raises(SystemExit, match="only the mlp2x_gelu projector"):
        convert("--to-hf", tmp_path / "linear", "--out", tmp_path / "hf")
    canon = preset("tiny")
    VLM(dataclasses.replace(canon, lm=dataclasses.replace(canon.lm, conv_kernel=3))).save_pretrained(tmp_path / "c")
    with pytest.raises(SystemExit, match="no Canon layer, QK-norm or logit scale; this LM has conv_kernel=3"):
        convert("--to-hf", tmp_path / "c", "--out", tmp_path / "hf")
    stem = dataclasses.replace(canon.vision, patch_size=16, conv_stem=(8, 16, 16, 32))
    VLM(dataclasses.replace(canon, vision=stem)).save_pretrained(tmp_path / "stem")
    with pytest.raises(SystemExit, match=r"no conv stem; this tower has conv_stem=\(8, 16, 16, 32\)"):
        convert("--to-hf", tmp_path / "stem", "--out", tmp_path / "hf")
    VLM(dataclasses.replace(canon, vision=dataclasses.replace(canon.vision, depth=0))).save_pretrained(tmp_path / "d0")
    with pytest.raises(SystemExit, match="a tower with depth 0 does not give"):
        convert("--to-hf", tmp_path / "d0", "--out", tmp_path / "hf")
