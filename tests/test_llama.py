"""llama.py against transformers' LlamaForCausalLM / MistralForCausalLM, through our converter."""

import json

import pytest
import torch
from conftest import VOCAB, convert, llama_config, load_hf, random_init, rel_err, save, transformers

from llama import Llama, LlamaConfig
from model import VLM

VARIANTS = {  # name -> LlamaConfig overrides
    "gqa_llama3_untied": {},
    "tied_head": dict(tie_word_embeddings=True),
    "linear_rope_bias_head_dim": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                      attention_bias=True, head_dim=32),
    "default_rope_mha": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, num_key_value_heads=4),
}


def tokens(B=2, T=40, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def convert_lm(hf_lm_dir, clip_dir, out):
    convert("--vision", clip_dir, "--lm", hf_lm_dir, "--out", out)
    return VLM.from_pretrained(out).eval()


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, clip_dir, tmp_path):
    hf_dir = save(random_init(transformers.LlamaForCausalLM(llama_config(**VARIANTS[variant])), 7), tmp_path / "hf")
    ours = convert_lm(hf_dir, clip_dir, tmp_path / "ours")
    ref = load_hf(transformers.LlamaForCausalLM, hf_dir)
    ids = tokens()
    got = ours(ids)[0][..., :VOCAB]  # our vocab has one more row: the <image> placeholder
    assert rel_err(got, ref(ids).logits) < 1e-4
    assert ours.cfg.lm.tie_embeddings == VARIANTS[variant].get("tie_word_embeddings", False)


@torch.no_grad()
def test_mistral_logits_match_transformers(clip_dir, tmp_path):
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    hf_dir = save(random_init(transformers.MistralForCausalLM(cfg), 8), tmp_path / "hf")
    ours = convert_lm(hf_dir, clip_dir, tmp_path / "ours")
    ids = tokens()
    assert rel_err(ours(ids)[0][..., :VOCAB], load_hf(transformers.MistralForCausalLM, hf_dir)(ids).logits) < 1e-4


@torch.no_grad()
def test_llama3_rope_in_legacy_rope_scaling_form(llama_dir, clip_dir, tmp_path):
    """transformers-4 configs spell llama3 RoPE as rope_theta + rope_scaling; both must convert the same."""
    cfg = json.loads((llama_dir / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    ours = convert_lm(legacy, clip_dir, tmp_path / "ours")
    assert ours.cfg.lm.rope_scaling["type"] == "llama3" and ours.cfg.lm.rope_theta == 500000.0
    ids = tokens()
    assert rel_err(ours(ids)[0][..., :VOCAB], load_hf(transformers.LlamaForCausalLM, llama_dir)(ids).logits) < 1e-4


LEVERS = {"canon": dict(conv_kernel=3), "qk_norm": dict(qk_norm=True), "logit_scale": dict(logit_scale=4.0)}
ALL_LEVERS = dict(conv_kernel=3, qk_norm=True, logit_scale=4.0)


def small_llama(**levers):
    torch.manual_seed(0)
    lm = Llama(LlamaConfig(vocab_size=97, dim=64, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=128,
                           rope_scaling={"type": "linear", "factor": 2.0}, **levers)).eval()
    with torch.no_grad():  # trained values, not the init's zeros and ones, so every lever changes the output
        for name, p in lm.named_parameters():
            if name.endswith(("conv.weight", "q_norm.weight", "k_norm.weight", "logit_scale")):
                p.uniform_(0.5, 1.5)
    return lm


@torch.no_grad()
@pytest.mark.parametrize("levers", [{}, *LEVERS.values(), ALL_LEVERS], ids=["plain", *LEVERS, "all"])
def test_kv_cache_decode_matches_full_forward(levers):
    lm = small_llama(**levers)
    x = torch.randn(2, 12, 64)
    positions = torch.arange(12).expand(2, 12)
    full = lm(x, positions)
    lm.setup_cache(2, 16)
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :5] = True
    slots = torch.arange(5)
    mask = torch.arange(16)[None, :] <= slots[:, None]  # (T, S) causal over the cache
    steps = [lm(x[:, :5], positions[:, :5], (mask[None] & valid[:, None])[:, None], slots)]
    for t in range(5, 12):  # then one token at a time
        valid[:, t] = True
        steps.append(lm(x[:, t : t + 1], positions[:, t : t + 1], valid[:, None, None, :], torch.tensor([t])))
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@torch.no_grad()
def test_plain_attention_equals_fused_kernel():
    lm = small_llama()
    x = torch.randn(2, 10, 64)
    positions = torch.arange(10).expand(2, 10)
    fused = lm(x, positions)
    plain, attentions = lm(x, positions, need_weights=True)
    assert rel_err(plain, fused) < 1e-5
    assert len(attentions) == 3 and attentions[0].shape == (2, 8, 10, 10)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(2, 8, 10))
    assert attentions[0][0, 0].triu(1).abs().max() == 0  # causal: nothing attends to the future


def test_gqa_does_not_copy_kv(monkeypatch):
    """The fused path hands SDPA the nkv-headed K/V (enable_gqa), never a repeated copy."""
    import llama

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(llama.F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(k.shape) or
                        real(q, k, v, **kw))
    if not llama.SDPA_HAS_GQA:
        pytest.skip("this torch has no enable_gqa: the plain path broadcasts K/V instead")
    small_llama()(torch.randn(1, 4, 64), torch.arange(4)[None])
    assert len(seen) == 3 and all(shape[1] == 2 for shape in seen)


@torch.no_grad()
def test_canon_layer_is_causal_and_stays_within_a_packed_sample():
    """Changing tokens after t leaves outputs up to t alone; a packed row equals its two samples run apart."""
    lm = small_llama(conv_kernel=4)
    x = torch.randn(1, 12, 64)
    positions = torch.arange(12)[None]
    later = x.clone()
    later[:, 7:] = torch.randn(1, 5, 64)
    assert torch.equal(lm(later, positions)[:, :7], lm(x, positions)[:, :7])
    same = torch.tensor([[0] * 5 + [1] * 7])  # (1, T) segment ids
    mask = (same[:, :, None] == same[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    packed = lm(x, torch.tensor([list(range(5)) + list(range(7))]), mask[:, None])
    apart = torch.cat([lm(x[:, :5], positions[:, :5]), lm(x[:, 5:], positions[:, :7])], dim=1)
    assert rel_err(packed, apart) < 1e-5


def test_levers_are_off_by_default_and_add_no_weights():
    """Converted checkpoints load strictly: a plain config has none of the levers' tensors."""
    plain = {n for n, _ in small_llama().named_parameters()}
    levered = {n for n, _ in small_llama(**ALL_LEVERS).named_parameters()}
    assert plain < levered
    assert {n.split(".", 3)[-1] for n in levered - plain} == {"conv.weight", "q_norm.weight", "k_norm.weight",
                                                              "logit_scale"}


@torch.no_grad()
def test_logit_scale_multiplies_each_heads_attention_logits():
    """RoPE is linear, so scaling head h's logits by s_h equals scaling its rows of the query weight by s_h."""
    scaled, plain = small_llama(logit_scale=1.0), small_llama()
    for block in scaled.blocks:  # sharp enough to move small random weights' near-uniform attention
        block.attn.logit_scale.copy_(torch.linspace(5, 40, 8).view(8, 1, 1))
    state = {k: v for k, v in scaled.state_dict().items() if not k.endswith("logit_scale")}
    for i, block in enumerate(scaled.blocks):
        rows = block.attn.logit_scale.repeat_interleave(block.attn.head_dim).view(-1, 1)  # (nh * hs, 1)
        q_dim = rows.size(0)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([state[f"blocks.{i}.attn.qkv.weight"][:q_dim] * rows,
                                                          state[f"blocks.{i}.attn.qkv.weight"][q_dim:]])
    plain.load_state_dict(state)
    x, positions = torch.randn(2, 9, 64), torch.arange(9).expand(2, 9)
    assert rel_err(scaled(x, positions), plain(x, positions)) < 1e-5
    assert rel_err(small_llama()(x, positions), plain(x, positions)) > 1e-3  # the scales did change the output
