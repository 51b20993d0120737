"""convert_weights.py: every supported checkpoint layout converts to the same numbers as transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    VOCAB,
    clip_vision_config,
    convert,
    image_prompt,
    llama_config,
    llava_model,
    load_hf,
    random_init,
    rel_err,
    save,
    siglip_vision_config,
    transformers,
)
from safetensors.torch import load_file, save_file

from model import VLM, preset

ROOT = Path(__file__).resolve().parents[1]


def rewrite(src: Path, dst: Path, rename=lambda k: k, extra=None) -> Path:
    """Copy a checkpoint dir with renamed (or extra) tensors, as other tools and versions lay them out."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    save_file(state | (extra or {}), dst / "model.safetensors")
    return dst


def vision_hidden(ref_vision, px, layer=-2):
    return ref_vision(px, output_hidden_states=True).hidden_states[layer]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_full_two_tower_models_convert_their_vision_side(kind, llama_dir, tmp_path):
    if kind == "clip":
        cfg = transformers.CLIPConfig(vision_config=clip_vision_config().to_dict(),
                                      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=4, vocab_size=50))
        full = random_init(transformers.CLIPModel(cfg), 11)
    else:
        cfg = transformers.SiglipConfig(vision_config=siglip_vision_config().to_dict(),
                                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=4, vocab_size=50))
        full = random_init(transformers.SiglipModel(cfg), 12)
    save(full, tmp_path / "hf")
    convert("--vision", tmp_path / "hf", "--lm", llama_dir, "--out", tmp_path / "ours")
    ours = VLM.from_pretrained(tmp_path / "ours")
    px = torch.randn(2, 3, 32, 32)
    assert ours.cfg.vision.class_token == (kind == "clip")
    assert rel_err(ours.vision(px, -2), vision_hidden(full.vision_model, px)) < 1e-4


@torch.no_grad()
def test_vision_model_prefix_and_stale_buffers_are_accepted(clip_dir, llama_dir, tmp_path):
    """Older transformers saved CLIPVisionModel under `vision_model.` plus a position_ids buffer, and
    Llama with rotary inv_freq buffers: the same weights must convert to the same model."""
    vision = rewrite(clip_dir, tmp_path / "v", lambda k: "vision_model." + k,
                     {"vision_model.embeddings.position_ids": torch.arange(17)[None]})
    lm = rewrite(llama_dir, tmp_path / "l", extra={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    convert("--vision", clip_dir, "--lm", llama_dir, "--out", tmp_path / "plain")
    convert("--vision", vision, "--lm", lm, "--out", tmp_path / "legacy")
    assert load_file(tmp_path / "plain" / "model.safetensors").keys() == \
        load_file(tmp_path / "legacy" / "model.safetensors").keys()
    for k, v in load_file(tmp_path / "plain" / "model.safetensors").items():
        if not k.startswith("projector."):
            assert torch.equal(v, load_file(tmp_path / "legacy" / "model.safetensors")[k]), k


@torch.no_grad()
def test_sharded_lm_converts(clip_dir, llama_dir, tmp_path):
    hf = load_hf(transformers.LlamaForCausalLM, llama_dir)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert("--vision", clip_dir, "--lm", tmp_path / "sharded", "--out", tmp_path / "ours")
    ids = torch.randint(0, VOCAB, (2, 20))
    assert rel_err(VLM.from_pretrained(tmp_path / "ours")(ids)[0][..., :VOCAB], hf(ids).logits) < 1e-4


def test_towers_get_an_image_token_row_and_a_fresh_projector(clip_dir, llama_dir, tmp_path):
    convert("--vision", clip_dir, "--lm", llama_dir, "--out", tmp_path / "ours", "--projector", "pixel_shuffle")
    ours = VLM.from_pretrained(tmp_path / "ours")
    assert ours.cfg.image_token_id == VOCAB and ours.cfg.lm.vocab_size == VOCAB + 1
    table = ours.lm.tok_embed.weight
    assert torch.allclose(table[VOCAB], table[:VOCAB].mean(0), atol=1e-6)
    assert ours.cfg.num_image_tokens == 4  # a 4 x 4 grid, shuffled 2 x 2
    assert ours.cfg.feature_layer == -2 and ours.cfg.drop_cls


@torch.no_grad()
def test_fresh_vision_puts_a_from_scratch_preset_tower_before_the_converted_lm(clip_dir, llama_dir, tmp_path):
    """--fresh-vision tiny: the tiny preset's tower and feature choice with random weights, the LM exactly as
    --vision converts it: a pretrained LM that learns to see ShapesWorld (experiments.py's binding control)."""
    convert("--fresh-vision", "tiny", "--lm", llama_dir, "--out", tmp_path / "fresh")
    convert("--vision", clip_dir, "--lm", llama_dir, "--out", tmp_path / "clip")
    fresh, tiny = VLM.from_pretrained(tmp_path / "fresh"), preset("tiny")
    assert (fresh.cfg.vision, fresh.cfg.feature_layer, fresh.cfg.drop_cls) == (tiny.vision, -1, False)
    lm = {k: v for k, v in load_file(tmp_path / "fresh" / "model.safetensors").items() if k.startswith("lm.")}
    clip_lm = {k: v for k, v in load_file(tmp_path / "clip" / "model.safetensors").items() if k.startswith("lm.")}
    assert lm.keys() == clip_lm.keys() and all(torch.equal(v, clip_lm[k]) for k, v in lm.items())
    ids = image_prompt(fresh.cfg.num_image_tokens, fresh.cfg.image_token_id)  # 36 tokens: 8 px patches of 48 px
    assert torch.isfinite(fresh(ids, torch.randn(1, 3, 48, 48))[0]).all()
    with pytest.raises(SystemExit):
        convert("--vision", clip_dir, "--fresh-vision", "tiny", "--lm", llama_dir, "--out", tmp_path / "both")


@torch.no_grad()
def test_newer_llava_hf_layout_converts(llava_clip_dir, tmp_path):
    """transformers >= 4.52 keeps `model.language_model.*`, `model.vision_tower.*` and a top-level lm_head."""
    def rename(k):
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                return new + k[len(old):]
        return k

    newer = rewrite(llava_clip_dir, tmp_path / "newer", rename)
    assert any(k.startswith("model.language_model.") for k in load_file(newer / "model.safetensors"))
    convert("--llava", newer, "--out", tmp_path / "ours")
    ours = VLM.from_pretrained(tmp_path / "ours")
    ref = load_hf(transformers.LlavaForConditionalGeneration, llava_clip_dir)
    ids, px = image_prompt(16, VOCAB - 1), torch.randn(1, 3, 32, 32)
    assert rel_err(ours(ids, px)[0], ref(input_ids=ids, pixel_values=px).logits) < 1e-4


def test_llava_hf_carries_its_bpe_tokenizer_and_template_both_ways(llava_clip_dir, tmp_path):
    """A llava-hf release (LLaVA-NeXT on Llama-3, OneVision on Qwen2) ships tokenizer.json, not tokenizer.model:
    --llava must bring it and its chat template along, and --to-hf must hand it back."""
    from tokenizers import AddedToken, Tokenizer

    src = rewrite(llava_clip_dir, tmp_path / "llava")
    tok = tiny_tokenizer_json(src / "tokenizer.json", 40)
    bpe = Tokenizer.from_file(str(tok))
    bpe.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    bpe.save(str(tok))
    convert("--llava", src, "--out", tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == tok.read_text()
    assert VLM.from_pretrained(tmp_path / "ours").cfg.template == "chatml"
    convert("--to-hf", tmp_path / "ours", "--out", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == tok.read_text()


@torch.no_grad()
@pytest.mark.parametrize("separate_projector", [False, True])
def test_original_llava_repo_bin_checkpoints_convert(separate_projector, clip_dir, tmp_path):
    """Original LLaVA: LlavaLlamaForCausalLM in pytorch_model.bin (+ mm_projector.bin), CLIP given separately."""
    ref = llava_model(transformers.CLIPVisionConfig.from_pretrained(clip_dir), seed=21)
    ref.model.vision_tower.load_state_dict(load_hf(transformers.CLIPVisionModel, clip_dir).state_dict())
    state = {"model." + k: v for k, v in ref.model.language_model.state_dict().items()}
    state["lm_head.weight"] = ref.lm_head.weight
    projector = {f"model.mm_projector.{i}.{p}": getattr(ref.model.multi_modal_projector, f"linear_{j}").get_parameter(p)
                 for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")}
    out = tmp_path / "llava"
    out.mkdir()
    torch.save(state if separate_projector else state | projector, out / "pytorch_model.bin")
    if separate_projector:
        torch.save(projector, out / "mm_projector.bin")
    text = llama_config().to_dict()
    cfg = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                "max_position_embeddings", "rope_parameters")}
    cfg |= {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32}
    (out / "config.json").write_text(json.dumps(cfg))
    convert("--llava", out, "--vision", clip_dir, "--out", tmp_path / "ours")
    ours = VLM.from_pretrained(tmp_path / "ours")
    assert ours.cfg.image_token_id == VOCAB  # LLaVA's -200 becomes a real, new row
    ids = image_prompt(16, VOCAB)
    ref_ids = ids.masked_fill(ids == VOCAB, VOCAB - 1)  # the oracle's placeholder id
    px = torch.randn(1, 3, 32, 32)
    assert rel_err(ours(ids, px)[0][..., :VOCAB], ref(input_ids=ref_ids, pixel_values=px).logits) < 1e-4


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_errors_are_one_line_without_traceback(clip_dir, llama_dir, tmp_path):
    bad = rewrite(llama_dir, tmp_path / "bad", extra={"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    r = run_cli("--vision", clip_dir, "--lm", bad, "--out", tmp_path / "o")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "model.layers.0.self_attn.q_norm.weight" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("--vision", tmp_path / "nowhere", "--lm", llama_dir, "--out", tmp_path / "o")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nowhere" in r.stderr


def tiny_tokenizer_json(path: Path, n_tokens: int) -> Path:
    """A byte-level-free BPE tokenizer.json of n_tokens tokens: "<unk>", "<s>", "</s>", then "t3", "t4", ..."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, n_tokens)])}
    Tokenizer(models.BPE(vocab, [], unk_token="<unk>")).save(str(path))
    return path


def test_cli_prints_a_one_line_summary(clip_dir, llama_dir, tmp_path):
    lm = rewrite(llama_dir, tmp_path / "lm")
    tiny_tokenizer_json(lm / "tokenizer.json", 50)
    r = run_cli("--vision", clip_dir, "--lm", lm, "--out", tmp_path / "o", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "M parameters, bfloat16, 16 image tokens" in r.stdout
    assert (tmp_path / "o" / "tokenizer.json").read_text() == (lm / "tokenizer.json").read_text()
    assert VLM.from_pretrained(tmp_path / "o").lm.tok_embed.weight.dtype == torch.bfloat16


def test_hf_lm_refuses_a_tokenizer_larger_than_its_embedding_table(clip_dir, llama_dir, tmp_path):
    lm = rewrite(llama_dir, tmp_path / "lm")
    tiny_tokenizer_json(lm / "tokenizer.json", VOCAB + 5)
    r = run_cli("--vision", clip_dir, "--lm", lm, "--out", tmp_path / "o")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{lm / 'tokenizer.json'}: {VOCAB + 5} tokens, but the model's embedding table has only {VOCAB} rows" \
        in r.stderr


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_source_keeps_no_safetensors_file_mapped_between_reads(llama_dir):
    """A safetensors handle left open keeps every page read through its memory map resident: converting a 7B
    model would then show its whole size in RSS. The Source opens the file for each read, and the tensor it gives
    is the only thing that maps its pages."""
    import convert_weights

    src = convert_weights.Source.from_dir(llama_dir)
    assert src.get("model.embed_tokens.weight").shape == (VOCAB, 64)  # read, then dropped
    assert str(llama_dir / "model.safetensors") not in Path("/proc/self/maps").read_text()
