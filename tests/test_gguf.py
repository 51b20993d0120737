"""convert_weights.py --lm FILE.gguf on tiny random llama.cpp files: the same numbers as transformers' reading of the
same file, and a one-line refusal for each kind of bad file. The real SmolLM2 GGUF is in test_real_model.py."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, convert, llama_config, random_init, rel_err, transformers

import convert_weights
from model import VLM
from quantize import Int4Linear

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]  # byte-level BPE spells " " and "\n" so
TOKENS = SPECIALS + CHARS + [f"Ġ{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + ["12"]  # 126 tokens


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the step our converter undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores as `rope_freqs.weight` for Llama-3.1's RoPE scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path, model, arch="llama", tokens=TOKENS, tied=False, qtype=gguf.GGMLQuantizationType.Q8_0,
               norm_dtype=np.float32, rope_freqs=None):
    """A llama.cpp-style file from a transformers Llama: GGUF names, permuted q/k, 2-D weights quantized (F32 with
    qtype=None)."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.add_vocab_size(c.vocab_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(["Ġ a", "1 2"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.{kind}": f"blk.{i}.{ours}.{kind}" for hf, ours in parts.items()
                  for kind in ("weight", "bias")}
    state = model.state_dict()
    for hf, name in names.items():
        if (tied and name == "output.weight") or hf not in state:
            continue
        t = state[hf].numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = llama_cpp_permute(t, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        if t.ndim == 1 or qtype is None:
            w.add_tensor(name, t.astype(norm_dtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_qwen2():
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                   tie_word_embeddings=True)
    return random_init(transformers.Qwen2ForCausalLM(cfg), 8)


def tiny_llama(tied=False):
    cfg = llama_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tied)
    return random_init(transformers.LlamaForCausalLM(cfg), 7)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_llama())


def refusal(*args) -> str:
    with pytest.raises(SystemExit) as err:
        convert(*args)
    return str(err.value)


@torch.no_grad()
@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_gguf_converts_to_transformers_logits(arch, tied, siglip_dir, tmp_path):
    """Dequantized, with llama's q/k un-permuted (qwen2's never were): the logits of transformers' own reading of
    the same file."""
    path = write_gguf(tmp_path / "m.gguf", tiny_llama(tied) if arch == "llama" else tiny_qwen2(), arch, tied=tied)
    convert("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "ours")
    ours = VLM.from_pretrained(tmp_path / "ours")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    assert (ours.cfg.lm.tie_embeddings, ours.cfg.lm.attn_bias, ours.cfg.lm.proj_bias) == (tied, arch == "qwen2", False)
    ids = torch.randint(3, VOCAB - 3, (2, 11), generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(ids)[0][..., :VOCAB], ref(ids).logits) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_become_int4_layers_exactly(qtype, siglip_dir, tmp_path, capsys, monkeypatch):
    """--quantize int4 takes a Q4 file's blocks as stored: each Int4Linear dequantizes to exactly the weights the
    plain conversion dequantizes (the gguf package's reading, q/k un-permuted, q/k/v and gate/up stacked). Q4_0's
    blocks (w = d (q - 8)) are not what rounding the dequantized weights to nearest would give. The blocks are
    copied while the checkpoint is written: those weights are never dequantized."""
    path = write_gguf(tmp_path / "q4.gguf", tiny_llama(), qtype=getattr(gguf.GGMLQuantizationType, qtype))
    convert("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "fp32")
    dequantized, get = set(), convert_weights.GGUFSource.get

    def recording_get(self, key, meta=False):
        if not meta:
            dequantized.add(key)
        return get(self, key, meta)

    monkeypatch.setattr(convert_weights.GGUFSource, "get", recording_get)
    convert("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "int4", "--quantize", "int4")
    assert "8 of 8 int4 layers are the file's own Q4 blocks" in capsys.readouterr().out
    assert "token_embd.weight" in dequantized and "output.weight" in dequantized  # the head stays int8
    assert not [k for k in dequantized if k.startswith("blk.") and "norm" not in k], sorted(dequantized)
    fp32, int4 = VLM.from_pretrained(tmp_path / "fp32"), VLM.from_pretrained(tmp_path / "int4")
    layers = [name for name, m in int4.named_modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 8  # 2 blocks x (qkv, proj, gate_up, down)
    for name in layers:
        assert torch.equal(int4.get_submodule(name).dequantize(), fp32.get_submodule(name).weight), name
    ids = torch.randint(3, VOCAB - 3, (1, 12), generator=torch.Generator().manual_seed(0))
    assert rel_err(int4(ids)[0], fp32(ids)[0]) < 0.05  # the fused kernel's bf16 and the int8 head


LONG_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 16.0, "original_max_position_embeddings": 1024}  # two wavelengths blended


@torch.no_grad()
def test_gguf_rope_freqs_become_llama3_scaling(siglip_dir, tmp_path):
    """Llama-3.1+ files store the scaling as per-frequency divisors: read back, they give the original model's
    logits over 200 positions (the file's weights are left unquantized, so the original is the oracle)."""
    model = random_init(transformers.LlamaForCausalLM(llama_config(rope_parameters=dict(LONG_ROPE))), 9)
    path = write_gguf(tmp_path / "l3.gguf", model, qtype=None, rope_freqs=llama_cpp_rope_factors(LONG_ROPE, 16))
    convert("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "ours")
    ours = VLM.from_pretrained(tmp_path / "ours")
    assert ours.cfg.lm.rope_scaling["type"] == "llama3"
    ids = torch.randint(3, VOCAB - 3, (1, 200), generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(ids)[0][..., :VOCAB], model(ids).logits) < 1e-4
    bad = write_gguf(tmp_path / "bad.gguf", model, rope_freqs=np.linspace(1, 8, 8, dtype=np.float32))
    assert f"{bad}: 'rope_freqs.weight' does not follow Llama-3's RoPE scaling recipe" in refusal(
        "--vision", siglip_dir, "--lm", bad, "--out", tmp_path / "bad")


def test_gguf_writes_its_tokenizer_and_special_tokens(tiny_gguf, siglip_dir, tmp_path):
    from tokenizers import Tokenizer

    convert("--vision", siglip_dir, "--lm", tiny_gguf, "--out", tmp_path / "ours")
    tok = Tokenizer.from_file(str(tmp_path / "ours" / "tokenizer.json"))
    # SmolLM2's pre-tokenizer ("smollm") splits digits one by one before BPE, so the merge "1 2" never applies
    assert tok.encode("<|im_start|>a a 12", add_special_tokens=False).tokens == ["<|im_start|>", "a", "Ġa", "Ġ",
                                                                                   "1", "2"]
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in (tmp_path / "ours" / "chat_template.jinja").read_text()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["template"] == "chatml"  # detected
    convert("--vision", siglip_dir, "--lm", tiny_gguf, "--out", tmp_path / "vicuna", "--template", "vicuna_v1")
    assert json.loads((tmp_path / "vicuna" / "config.json").read_text())["template"] == "vicuna_v1"  # overridden


def test_gguf_refuses_a_truncated_file(tiny_gguf, siglip_dir, tmp_path):
    data = tiny_gguf.read_bytes()
    for size in (20, 2000, len(data) - 1):  # in the header, the metadata, the last tensor
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        message = refusal("--vision", siglip_dir, "--lm", cut, "--out", tmp_path / "out")
        assert f"{cut}: truncated or corrupt GGUF file ({size} bytes" in message
        assert "\n" not in message


def test_gguf_refuses_a_non_llama_architecture(siglip_dir, tmp_path):
    path = write_gguf(tmp_path / "f.gguf", tiny_llama(), arch="falcon")
    assert f"{path}: architecture 'falcon' is not Llama-like" in refusal("--vision", siglip_dir, "--lm", path,
                                                                           "--out", tmp_path / "out")


def test_gguf_refuses_a_type_it_cannot_dequantize_naming_the_tensor(siglip_dir, tmp_path):
    path = write_gguf(tmp_path / "f64.gguf", tiny_llama(), norm_dtype=np.float64)
    message = refusal("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "out")
    assert f"{path}: tensor 'output_norm.weight' is F64, which the gguf package cannot dequantize" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_gguf_refuses_a_vocabulary_larger_than_the_embedding_table(siglip_dir, tmp_path):
    tokens = TOKENS + [f"Ġ{c}" for c in "ABCDEFG"]  # 133 tokens for 128 rows
    path = write_gguf(tmp_path / "v.gguf", tiny_llama(), tokens=tokens)
    message = refusal("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "out")
    assert f"{path}: the tokenizer has 133 tokens, but the embedding table 'token_embd.weight' has only 128" in message


def test_gguf_refuses_a_file_that_is_not_gguf(siglip_dir, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    assert f"{path}: not a GGUF file" in refusal("--vision", siglip_dir, "--lm", path, "--out", tmp_path / "out")


def test_gguf_without_the_package_says_how_to_install_it(tiny_gguf, siglip_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` now raises ImportError
    assert refusal("--vision", siglip_dir, "--lm", tiny_gguf, "--out", tmp_path / "out").endswith("pip install gguf")
