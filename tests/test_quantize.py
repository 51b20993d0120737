"""quantize.py: int8 and int4 weights within half a step of the originals, the fused kernels equal to their plain
references, strict save/load of a quantized checkpoint, quantized greedy decoding against fp32, and the compiled CPU
decode step."""

import copy
from collections import Counter

import pytest
import torch
from conftest import convert, rel_err
from safetensors.torch import load_file, save_file

import convert_weights
from model import VLM, preset
from quantize import (
    Int4Linear,
    Int8Linear,
    pack_nibbles,
    quantize_int4,
    quantize_int4_weight,
    quantize_int8,
    quantize_weight,
    unpack_nibbles,
)


def linear(in_features=96, out_features=80, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # rows of very different scales, as real layers have: a per-tensor scale would fail
        layer.weight.mul_(torch.logspace(-2, 1, out_features)[:, None])
    return layer


def test_each_weight_is_within_half_a_step_of_its_row_scale():
    w = linear().weight
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and scales.shape == (w.size(0),)
    assert torch.equal(q.abs().amax(dim=1), torch.full((w.size(0),), 127, dtype=torch.int8))  # each row's max
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_the_plain_dequantized_matmul(dtype):
    layer = Int8Linear.from_linear(linear().to(dtype))
    x = torch.randn(3, 5, 96).to(dtype)  # (B, T, C): the kernel sees (15, 96)
    fused = layer(x)
    layer.fused = False
    plain = layer(x)
    assert fused.shape == (3, 5, 80) and fused.dtype == dtype
    # The kernel rounds activations, scales and outputs to bf16, each off by at most half a bf16 step (2^-9).
    assert rel_err(fused, plain) < 3 * 2**-9


@torch.no_grad()
def test_int8_output_error_is_within_the_rounding_bound():
    base = linear()
    x = torch.randn(4, 96)
    y = Int8Linear.from_linear(base)(x)
    _, scales = quantize_weight(base.weight)
    # |w - q s| <= s / 2 per weight, so |y - y_fp32| <= (s / 2) * sum |x|, plus the bf16 rounding of x
    bound = scales / 2 * x.abs().sum(1, keepdim=True) + (x - x.bfloat16().float()).abs() @ base.weight.abs().T
    assert ((y - base(x)).abs() <= bound * 1.001 + 1e-6).all()


def test_each_int4_weight_is_within_half_a_step_of_its_group():
    w = linear().weight  # (80, 96): groups of 32
    q, scales, mins = quantize_int4_weight(w, 32)
    assert q.dtype == torch.uint8 and scales.shape == mins.shape == (80, 3)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)  # two per byte, and back
    groups = q.view(80, 3, 32)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()  # each group's min and max
    w_hat = (q.view(80, 3, 32).float() * scales[..., None] + mins[..., None]).view(80, 96)
    assert ((w_hat - w).abs().view(80, 3, 32) <= scales[..., None] / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(Int4Linear.from_linear(linear()).dequantize(), w_hat)


@torch.no_grad()
@pytest.mark.parametrize("rows", [80, 83])  # 83: not a multiple of 16, so the kernel's copy is padded
def test_int4_fused_kernel_is_within_the_bf16_rounding_of_its_plain_reference(rows):
    """The fused kernel computes with bf16 activations, scales and zeros (zero = min + 8 scale, so w = (q - 8)
    scale + zero) and returns bf16, each rounded to within a relative 2^-9; its sums are fp32. So, per output,
    |fused - plain| <= sum_k |x_k - bf16(x_k)| |w_k| + |bf16(x_k)| 2^-9 (|q_k - 8| |scale| + |zero|), plus 2^-9 of
    the output itself. A wrong zero, scale or nibble order is off by whole steps."""
    layer = Int4Linear.from_linear(linear(96, rows))
    x = torch.randn(15, 96)
    fused = layer(x)
    layer.fused = False
    plain = layer(x)
    assert fused.shape == plain.shape == (15, rows)
    q = unpack_nibbles(layer.weight).view(rows, 3, 32).float()
    zeros = (layer.mins + 8 * layer.scales)[..., None]  # (rows, 3, 1)
    w_err = (2**-9 * ((q - 8).abs() * layer.scales[..., None] + zeros.abs())).view(rows, 96)
    xb = x.bfloat16().float()
    bound = (x - xb).abs() @ layer.dequantize().abs().T + xb.abs() @ w_err.T + 2**-9 * plain.abs()
    assert ((fused - plain).abs() <= bound * 1.01 + 1e-5).all()
    assert (fused - plain).abs().max() > 0  # the fused path did run, in bf16


def test_int4_refuses_groups_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="int4 groups of 32 do not fit 40 inputs"):
        quantize_int4(torch.nn.Sequential(torch.nn.Linear(40, 16)))


def test_quantize_swaps_every_linear_but_the_skipped_and_refuses_none():
    model = VLM(preset("tiny"))
    quantize_int8(model.lm, skip=("head",))
    assert type(model.lm.head) is torch.nn.Linear
    assert all(type(m) is not torch.nn.Linear for m in model.lm.blocks.modules())
    with pytest.raises(ValueError, match="no nn.Linear to quantize"):
        quantize_int8(torch.nn.Sequential(torch.nn.ReLU()))


@torch.no_grad()
@pytest.mark.parametrize("kind, layer, key", [("int8", Int8Linear, "scales"), ("int4", Int4Linear, "mins")])
def test_quantized_checkpoint_round_trip_is_strict(tmp_path, kind, layer, key):
    torch.manual_seed(0)
    model = VLM(preset("tiny")).eval().quantize(kind)
    model.save_pretrained(tmp_path)
    again = VLM.from_pretrained(tmp_path).eval()  # memory-mapped weights: the int8 kernel needs them aligned
    assert again.cfg.quantize == kind and isinstance(again.lm.blocks[0].mlp.down, layer)
    assert isinstance(again.lm.head, Int8Linear)  # int4 too: its head stays int8
    ids = torch.randint(3, 500, (2, 9))
    assert torch.equal(again(ids)[0], model(ids)[0])
    state = load_file(tmp_path / "model.safetensors")
    assert state["lm.head.weight"].dtype == torch.int8  # the tied head is its own int8 copy
    assert "lm.blocks.0.mlp.down.packed" not in state  # the kernel's copy is made at load, never saved
    del state[f"lm.blocks.0.mlp.down.{key}"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=f"missing tensor 'lm.blocks.0.mlp.down.{key}'"):
        VLM.from_pretrained(tmp_path)


def snap_to_int4(model: VLM):
    """Round the LM's linear weights to the int4 grid in place, as a GGUF file's Q4 weights already are: the
    int4 model made from it then differs from it only by the kernel's bf16 rounding."""
    for m in model.lm.modules():
        if type(m) is torch.nn.Linear and m is not model.lm.head:
            m.weight.copy_(Int4Linear.from_linear(m).dequantize())


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_greedy_decoding_matches_fp32_while_its_lead_exceeds_the_error(kind):
    """The bound N is measured, not picked: quantizing shifts no logit by more than eps (measured on fp32's own
    greedy tokens), so it cannot change a step whose fp32 top-1 leads the runner-up by more than 2 eps. N is the
    run of such steps from the start. On this model int8 gives eps 0.017, N = 32 and 6 (first divergence 32, 9).
    int4 starts, as a GGUF Q4 file's weights do, from weights already on its grid (snap_to_int4): eps 0.011, N = 8
    and 7 (first divergence 16, 18); from the random weights themselves, eps is 0.16 and N only 0 and 2."""
    cfg = preset("tiny")
    cfg.lm.tie_embeddings = False  # a tied random model repeats its prompt's last token; untied, it wanders
    torch.manual_seed(2)
    fp32 = VLM(cfg).eval()
    if kind == "int4":
        snap_to_int4(fp32)
    quantized = copy.deepcopy(fp32).quantize(kind)
    prompts = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(2))
    tokens = fp32.generate(prompts, max_new_tokens=32)
    full = torch.cat([prompts, tokens], dim=1)
    logits = fp32(full)[0][:, prompts.size(1) - 1 : -1]  # (B, 32, V): the logits each new token came from
    eps = (quantized(full)[0][:, prompts.size(1) - 1 : -1] - logits).abs().max()
    top2 = logits.topk(2).values
    safe = top2[..., 0] - top2[..., 1] > 2 * eps  # (B, 32)
    n_safe = safe.long().cumprod(dim=1).sum(dim=1)  # (B,) N per row
    assert n_safe.max() > 0, f"the bound is empty: eps {eps:.4f} exceeds half of every first step's lead"
    quantized_tokens = quantized.generate(prompts, max_new_tokens=32)
    for row, n in enumerate(n_safe.tolist()):
        assert torch.equal(quantized_tokens[row, :n], tokens[row, :n]), f"row {row}: {kind} diverged within N = {n}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", [None, "int8", "int4"])
def test_compiled_cpu_decode_step_gives_the_eager_tokens(kind):
    """sample.py --compile on CPU: inductor over the static cache of new_state(), token for token, with padding."""
    torch.manual_seed(0)
    model = VLM(preset("tiny")).eval()
    if kind:
        model.quantize(kind)
    prompts = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts, dtype=torch.bool)
    mask[1, :4] = False  # the second row is shorter: left padding
    eager = model.generate(prompts, max_new_tokens=24, attention_mask=mask)
    model.compile_decode_step()
    state = model.new_state(2)
    for _ in range(2):  # the second call reuses the state, as a chat or eval.py's batches do
        state.reset()
        assert torch.equal(model.generate(prompts, max_new_tokens=24, attention_mask=mask, state=state), eager)


@torch.no_grad()
def test_convert_weights_quantize_writes_a_checkpoint_that_loads_strictly(siglip_dir, llama_dir, tmp_path):
    convert("--vision", siglip_dir, "--lm", llama_dir, "--out", tmp_path / "fp32")
    convert("--vision", siglip_dir, "--lm", llama_dir, "--out", tmp_path / "int8", "--quantize", "int8")
    fp32, int8 = VLM.from_pretrained(tmp_path / "fp32").eval(), VLM.from_pretrained(tmp_path / "int8").eval()
    assert int8.cfg.quantize == "int8" and isinstance(int8.lm.blocks[0].mlp.down, Int8Linear)
    assert torch.equal(int8.lm.tok_embed.weight, fp32.lm.tok_embed.weight)  # embeddings stay as they were
    ids = torch.randint(3, 100, (1, 12))
    assert rel_err(int8(ids)[0], fp32(ids)[0]) < 0.05  # measured 0.014; a misplaced tensor gives ~1


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_convert_weights_quantize_streams_each_layer_from_one_read(kind, siglip_dir, llama_dir, tmp_path,
                                                                    monkeypatch):
    """--quantize rounds each LM layer while it is written, so a 7B model converts in about one layer of extra
    RAM: no float model is ever loaded, and each source tensor is read once (not once per stored key: weight,
    scales, mins)."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the converter loaded a whole model")

    reads, get = Counter(), convert_weights.Source.get

    def counting_get(self, key, meta=False):
        reads[key] += not meta
        return get(self, key, meta)

    monkeypatch.setattr(VLM, "load_checked", no_loading)  # from_pretrained fills a model through it
    monkeypatch.setattr(convert_weights.Source, "get", counting_get)
    convert("--vision", siglip_dir, "--lm", llama_dir, "--out", tmp_path / kind, "--quantize", kind)
    assert reads["model.layers.1.mlp.gate_proj.weight"] == reads["lm_head.weight"] == 1
    assert set(reads.values()) == {1}, {k: n for k, n in reads.items() if n != 1}
