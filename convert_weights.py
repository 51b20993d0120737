"""Convert foreign checkpoints into ours, and ours back into transformers' LLaVA format.

This is the only file that knows transformers' and LLaVA's key names. Each weight's source is spelled out
in an explicit map (`{}` stands for the layer index); q/k/v and gate/up are concatenated into our fused
layers. Tensors stream one by one from memory-mapped files into the output, so converting a 7B model needs
about one tensor of extra RAM, not two copies of the model.

    python convert_weights.py --vision CLIP_DIR --lm LLAMA_DIR --out CKPT      # a new VLM, fresh projector
    python convert_weights.py --fresh-vision tiny --lm LM.gguf --out CKPT      # a from-scratch tower + a real LM
    python convert_weights.py --llava LLAVA_DIR --out CKPT                     # llava-hf or original LLaVA
    python convert_weights.py --to-hf CKPT --out HF_DIR                        # for transformers' LLaVA
"""

import argparse
import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from llama import LlamaConfig, rope_frequencies
from model import PRESETS, VLM, VLMConfig, preset
from projector import Projector, ProjectorConfig
from quantize import Int4Linear, Int8Linear, pack_nibbles, quantize_int4_weight, quantize_weight
from tokenizer import TEMPLATES, detect_template, load_tokenizer
from vit import VisionTransformer, ViTConfig

# ----------------------------------------------------------------------------- reading checkpoints


class Source:
    """The tensors of a checkpoint directory, read lazily from safetensors (sharded or not) or .bin files.

    `.bin` files are pickles: they are only ever opened with weights_only=True (no code runs) and mmap.
    """

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.opened: dict[Path, object] = {}
        for path in files:
            with self._open(path) as f:
                self.where |= dict.fromkeys(f.keys(), path)

    @classmethod
    def from_dir(cls, directory: Path, exclude=()) -> "Source":
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([directory / s for s in shards])
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
        files = [f for f in files if f.name not in exclude]
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
        return cls(files)

    def _open(self, path: Path):
        """A context giving a .bin file's tensors (loaded once, memory-mapped), or a safetensors handle for one read:
        while a handle is open, every page read through its memory map stays resident, so RSS would grow with the
        model however little of it is held."""
        if path.suffix == ".safetensors":
            return safe_open(path, framework="pt")
        if path not in self.opened:
            self.opened[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return contextlib.nullcontext(self.opened[path])

    def keys(self):
        return self.where.keys()

    def get(self, key: str, meta=False) -> torch.Tensor:
        """The tensor, or with meta=True an empty stand-in of the same shape and dtype (reads no data)."""
        if key not in self.where:
            raise KeyError(f"tensor '{key}' not found in the checkpoint")
        with self._open(self.where[key]) as f:
            if isinstance(f, dict):
                t = f[key]
                return torch.empty(t.shape, dtype=t.dtype, device="meta") if meta else t
            if meta:
                sl = f.get_slice(key)
                return torch.empty(sl.get_shape(), dtype=SAFETENSORS_DTYPES[sl.get_dtype()], device="meta")
            return f.get_tensor(key)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(path: Path, specs: dict, make, metadata=None):
    """Write a .safetensors file one tensor at a time: `specs` maps name -> meta tensor, `make(name)` -> tensor.

    The format is an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, then raw data,
    so the header can be written from shapes alone before any tensor is materialised.
    """
    to_code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, t in specs.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": to_code[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, spec in specs.items():
            t = make(name).to(spec.dtype).contiguous()
            if t.shape != spec.shape:
                raise ValueError(f"{name}: produced shape {tuple(t.shape)}, planned {tuple(spec.shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


# ----------------------------------------------------------------------------- configs

# transformers writes only non-default fields in older checkpoints, so its defaults must be known here.
HF_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, attention_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False),
}
# llava-hf's defaults when a config omits its sub-configs: CLIP-L/14-336 and a Llama.
LLAVA_DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
HF_ACT = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LlavaNextConfig's default
SIGLIP_IMAGE_STATS = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def with_defaults(c: dict, fallback_type: str) -> dict:
    kind = c.get("model_type", fallback_type)
    if kind in ("clip", "siglip"):  # a full two-tower config: the vision part is nested
        return with_defaults(c.get("vision_config", {}), kind + "_vision_model")
    kind = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(kind, kind)
    if kind not in HF_DEFAULTS:
        raise ValueError(f"unsupported model_type {kind!r} (supported: {', '.join(HF_DEFAULTS)})")
    return HF_DEFAULTS[kind] | c | {"model_type": kind}


def vit_config_from_hf(c: dict) -> ViTConfig:
    c = with_defaults(c, "clip_vision_model")
    siglip = c["model_type"] == "siglip_vision_model"
    if c["hidden_act"] not in HF_ACT:
        raise ValueError(f"unsupported vision hidden_act {c['hidden_act']!r}")
    return ViTConfig(
        image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
        depth=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
        act=HF_ACT[c["hidden_act"]], norm_eps=c["layer_norm_eps"], class_token=not siglip, patch_bias=siglip,
        pre_norm=not siglip, post_norm=siglip, **(SIGLIP_IMAGE_STATS if siglip else {}),
    )


def rope_from_hf(c: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers-4 `rope_theta` + `rope_scaling` or transformers-5 `rope_parameters`."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = params.pop("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": params["factor"]}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"type": "llama3", **{k: params[k] for k in keys}}
    raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")


def llama_config_from_hf(c: dict) -> LlamaConfig:
    c = with_defaults(c, "llama")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported LM hidden_act {c['hidden_act']!r} (Llama uses silu)")
    theta, scaling = rope_from_hf(c)
    qwen2 = c["model_type"] == "qwen2"  # a Llama with biases on q, k and v (not on o_proj)
    if qwen2 and c.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported")
    return LlamaConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"),
        hidden_dim=c["intermediate_size"], norm_eps=c["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
        max_seq_len=c["max_position_embeddings"], attn_bias=qwen2 or c["attention_bias"],
        proj_bias=not qwen2 and c["attention_bias"], tie_embeddings=c["tie_word_embeddings"],
    )


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}") from None


# ----------------------------------------------------------------------------- weight maps

STALE_BUFFERS = (r"rotary_emb\.inv_freq$", r"position_ids$")  # saved by old transformers, recomputed here
# CLIP's pooled-output norm and SigLIP's pooling head (LLaVA reads patch features), plus a two-tower model's text side
VISION_DROPPED = (r"post_layernorm\.", r"\bhead\.", r"^text_model\.", r"^(logit_scale|logit_bias)$",
                  r"^(visual|text)_projection\.")

# Our key -> transformers' key(s). A tuple is concatenated along dim 0 into one fused tensor.
VIT_MAP = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",
    "pre_norm.bias": "pre_layrnorm.bias",
    "post_norm.weight": "post_layernorm.weight",
    "post_norm.bias": "post_layernorm.bias",
    "blocks.{}.norm1.weight": "encoder.layers.{}.layer_norm1.weight",
    "blocks.{}.norm1.bias": "encoder.layers.{}.layer_norm1.bias",
    "blocks.{}.attn.qkv.weight": tuple(f"encoder.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv"),
    "blocks.{}.attn.qkv.bias": tuple(f"encoder.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"),
    "blocks.{}.attn.proj.weight": "encoder.layers.{}.self_attn.out_proj.weight",
    "blocks.{}.attn.proj.bias": "encoder.layers.{}.self_attn.out_proj.bias",
    "blocks.{}.norm2.weight": "encoder.layers.{}.layer_norm2.weight",
    "blocks.{}.norm2.bias": "encoder.layers.{}.layer_norm2.bias",
    "blocks.{}.mlp.fc1.weight": "encoder.layers.{}.mlp.fc1.weight",
    "blocks.{}.mlp.fc1.bias": "encoder.layers.{}.mlp.fc1.bias",
    "blocks.{}.mlp.fc2.weight": "encoder.layers.{}.mlp.fc2.weight",
    "blocks.{}.mlp.fc2.bias": "encoder.layers.{}.mlp.fc2.bias",
}
LLAMA_MAP = {  # relative to the decoder body ("model." in LlamaForCausalLM); the head is mapped separately
    "tok_embed.weight": "embed_tokens.weight",
    "blocks.{}.attn_norm.weight": "layers.{}.input_layernorm.weight",
    "blocks.{}.attn.qkv.weight": tuple(f"layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv"),
    "blocks.{}.attn.qkv.bias": tuple(f"layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"),
    "blocks.{}.attn.proj.weight": "layers.{}.self_attn.o_proj.weight",
    "blocks.{}.attn.proj.bias": "layers.{}.self_attn.o_proj.bias",
    "blocks.{}.mlp_norm.weight": "layers.{}.post_attention_layernorm.weight",
    "blocks.{}.mlp.gate_up.weight": ("layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.up_proj.weight"),
    "blocks.{}.mlp.down.weight": "layers.{}.mlp.down_proj.weight",
    "norm.weight": "norm.weight",
}
LLAVA_HF_PROJECTOR_MAP = {"net.0.weight": "linear_1.weight", "net.0.bias": "linear_1.bias",
                          "net.2.weight": "linear_2.weight", "net.2.bias": "linear_2.bias"}
LLAVA_ORIG_PROJECTOR_MAP = {  # original LLaVA: nn.Sequential for mlp2x_gelu, a bare Linear for `linear`
    "mlp2x_gelu": {f"net.{i}.{p}": f"mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")},
    "linear": {f"net.0.{p}": f"mm_projector.{p}" for p in ("weight", "bias")},
}


def expand(weight_map: dict, ours: str, theirs: str, n_layers: int) -> dict:
    """Prefix both sides and unroll `{}` over layers: {our full key: their key or tuple of keys}."""
    out = {}
    for k, v in weight_map.items():
        for i in range(n_layers) if "{}" in k else [0]:
            names = v if isinstance(v, tuple) else (v,)
            names = tuple(theirs + n.format(i) for n in names)
            out[ours + k.format(i)] = names if isinstance(v, tuple) else names[0]
    return out


def vision_prefix(src: Source, base: str) -> str:
    """Vision tower keys come with or without `vision_model.` (CLIPModel, CLIPVisionModel, saved variants)."""
    for prefix in (base + "vision_model.", base):
        if prefix + "embeddings.patch_embedding.weight" in src.keys():
            return prefix
    raise KeyError(f"no vision tower found (looked for '{base}[vision_model.]embeddings.patch_embedding.weight')")


def lm_prefixes(src: Source, candidates) -> tuple[str, str]:
    """(body prefix, head key) of the first layout whose embedding table is present."""
    for body, head in candidates:
        if body + "embed_tokens.weight" in src.keys():
            return body, head
    looked = ", ".join(body + "embed_tokens.weight" for body, _ in candidates)
    raise KeyError(f"no language model found (looked for {looked})")


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

GGUF_MAP = {  # our key -> llama.cpp's tensor name; the head ("output.weight") is mapped separately
    "tok_embed.weight": "token_embd.weight",
    "blocks.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "blocks.{}.attn.qkv.weight": tuple(f"blk.{{}}.attn_{p}.weight" for p in "qkv"),
    "blocks.{}.attn.qkv.bias": tuple(f"blk.{{}}.attn_{p}.bias" for p in "qkv"),
    "blocks.{}.attn.proj.weight": "blk.{}.attn_output.weight",
    "blocks.{}.attn.proj.bias": "blk.{}.attn_output.bias",
    "blocks.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
    "blocks.{}.mlp.gate_up.weight": ("blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight"),
    "blocks.{}.mlp.down.weight": "blk.{}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
}
# llama.cpp's architectures that are our blocks exactly -> whether its converter permuted their q/k rows.
# "llama" is Llama-1/2/3, Mistral 7B, TinyLlama and SmolLM2; "qwen2" (Qwen2/2.5) adds biases on q, k and v.
GGUF_ARCHS = {"llama": True, "qwen2": False}


def import_gguf():
    """The `gguf` package (llama.cpp's reader), needed only for GGUF input."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf") from None
    return gguf


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's q/k rows (x0, y0, x1, y1, ...) for its pairwise RoPE; we, like
    transformers, rotate halves (x0, x1, ..., y0, y1, ...). (n_heads * head_dim, ...) -> the same shape."""
    return w.reshape(n_heads, w.size(0) // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource:
    """The tensors and metadata of a llama.cpp GGUF file, read memory-mapped under their GGUF names.

    Each tensor is dequantized to float32 when it is asked for (any type the gguf package can dequantize), with
    llama.cpp's q/k row permutation undone, so conversion holds one tensor at a time in RAM.
    """

    def __init__(self, path: Path):
        self.gguf = import_gguf()
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        try:
            reader = self.gguf.GGUFReader(path)
        except (ValueError, IndexError) as err:  # how the reader fails when the file ends early
            raise ValueError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes; the reader "
                             f"stopped with: {err})") from None
        self.fields = reader.fields
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = self.field("general.architecture")
        if self.arch not in GGUF_ARCHS:
            raise ValueError(f"{path}: architecture {self.arch!r} is not Llama-like (supported: "
                             f"{', '.join(GGUF_ARCHS)})")
        self.rope_heads = {}  # tensor name -> heads whose rows llama.cpp permuted (filled by llama_config)
        for name, t in self.tensors.items():  # refuse before writing anything, naming the tensor
            try:
                self.gguf.quants.dequantize(t.data[:1], t.tensor_type)  # one row: cheap, and tells
            except NotImplementedError:
                raise ValueError(f"{path}: tensor '{name}' is {t.tensor_type.name}, which the gguf package cannot "
                                 f"dequantize") from None

    def field(self, key: str, default=None):
        """A metadata value, or `default` when the key is absent (None: the key is required)."""
        if key not in self.fields:
            if default is None:
                raise KeyError(f"{self.path}: metadata key '{key}' not found")
            return default
        return self.fields[key].contents()

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple:
        return tuple(reversed(self.tensors[key].shape.tolist()))  # ggml lists the innermost dimension first

    def get(self, key: str, meta=False) -> torch.Tensor:
        """The tensor as float32, or with meta=True an empty stand-in of the same shape (reads no data)."""
        if key not in self.tensors:
            raise KeyError(f"tensor '{key}' not found in {self.path}")
        if meta:
            return torch.empty(self.shape(key), dtype=torch.float32, device="meta")
        t = self.tensors[key]
        w = torch.from_numpy(self.gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(self.shape(key))
        return unpermute_rope_rows(w, self.rope_heads[key]) if key in self.rope_heads else w

    def is_q4(self, key: str) -> bool:
        """Whether a tensor is stored in Q4_0 or Q4_1 blocks, which an Int4Linear holds as they are (int4_blocks)."""
        return self.tensors[key].tensor_type.name in ("Q4_0", "Q4_1")

    def int4_blocks(self, key: str) -> list[torch.Tensor]:
        """A Q4_0 or Q4_1 tensor exactly as stored, in Int4Linear's terms: [q (out, in) in 0..15, scales, mins
        (out, in / 32)], q/k rows un-permuted. Q4_1 blocks hold w = d q + m, Q4_0 blocks w = d (q - 8), so
        min = -8 d (exact). A block is fp16 d [, fp16 m], then 16 bytes: the low nibbles are its first 16 weights,
        the high nibbles its last 16."""
        t = self.tensors[key]
        if not self.is_q4(key):
            raise ValueError(f"{self.path}: tensor '{key}' is {t.tensor_type.name}, not Q4_0 or Q4_1")
        rows, cols = self.shape(key)
        blocks = torch.from_numpy(t.data.copy()).view(rows, cols // 32, -1)  # (out, blocks, 18 or 20 bytes)
        scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # (out, blocks)
        if t.tensor_type.name == "Q4_1":
            mins, qs = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float(), blocks[..., 4:]
        else:
            mins, qs = -8 * scales, blocks[..., 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, cols)  # (out, in)
        parts = [q, scales, mins]
        return [unpermute_rope_rows(x, self.rope_heads[key]) for x in parts] if key in self.rope_heads else parts

    def llama_config(self) -> LlamaConfig:
        """Our config from llama.cpp's metadata keys (`llama.embedding_length`, ...)."""
        a = self.arch
        heads = self.field(f"{a}.attention.head_count")
        kv_heads = self.field(f"{a}.attention.head_count_kv", heads)
        dim = self.field(f"{a}.embedding_length")
        head_dim = self.field(f"{a}.attention.key_length", dim // heads)
        if self.field(f"{a}.rope.dimension_count", head_dim) != head_dim:
            raise ValueError(f"{self.path}: RoPE on {self.field(f'{a}.rope.dimension_count')} of {head_dim} "
                             f"channels per head (partial rotary) is not supported")
        scaling = self.field(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ValueError(f"{self.path}: RoPE scaling {scaling!r} is not supported (none, linear)")
        for i in range(self.field(f"{a}.block_count") if GGUF_ARCHS[a] else 0):
            self.rope_heads[f"blk.{i}.attn_q.weight"] = self.rope_heads[f"blk.{i}.attn_q.bias"] = heads
            self.rope_heads[f"blk.{i}.attn_k.weight"] = self.rope_heads[f"blk.{i}.attn_k.bias"] = kv_heads
        cfg = LlamaConfig(
            vocab_size=self.shape("token_embd.weight")[0], dim=dim, n_layers=self.field(f"{a}.block_count"),
            n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, hidden_dim=self.field(f"{a}.feed_forward_length"),
            norm_eps=self.field(f"{a}.attention.layer_norm_rms_epsilon"),
            rope_theta=self.field(f"{a}.rope.freq_base", 10000.0),
            rope_scaling={"type": "linear", "factor": self.field(f"{a}.rope.scaling.factor")}
            if scaling == "linear" else None,
            max_seq_len=self.field(f"{a}.context_length"), attn_bias="blk.0.attn_q.bias" in self.tensors,
            proj_bias="blk.0.attn_output.bias" in self.tensors, tie_embeddings="output.weight" not in self.tensors,
        )
        if "rope_freqs.weight" in self.tensors:  # Llama-3.1's long context, stored as a tensor
            cfg.rope_scaling = llama3_rope_from_factors(self.get("rope_freqs.weight"), cfg, self.path)
        return cfg


def llama3_rope_from_factors(factors: torch.Tensor, cfg: LlamaConfig, path) -> dict:
    """Read transformers' llama3 RoPE scaling back from llama.cpp's per-frequency divisors (`rope_freqs.weight`).

    They are 1 for short wavelengths, `factor` for long ones, and between, 1/f = 1/factor + (1 - 1/factor) s with
    s = (old_len / wavelength - low) / (high - low): a line in 1/wavelength, whose slope and intercept give
    old_len and high once low = 1 (every (low, high, old_len) on that line gives the same frequencies). Checked
    against rope_frequencies, so a file made any other way is refused, not misread.
    """
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)).double()
    f, factor = factors.double(), factors.max().item()
    middle = (f > 1 + 1e-4) & (f < factor - 1e-4)
    if middle.sum() < 2:
        raise ValueError(f"{path}: 'rope_freqs.weight' has {int(middle.sum())} blended frequencies; 2 are needed "
                         f"to read Llama-3's RoPE scaling back")
    x, s = plain[middle] / (2 * math.pi), (1 / f[middle] - 1 / factor) / (1 - 1 / factor)  # x = 1 / wavelength
    slope = ((s[-1] - s[0]) / (x[-1] - x[0])).item()
    intercept = (s[0] - slope * x[0]).item()
    scaling = {"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 1 - 1 / intercept,
               "original_max_position_embeddings": round(-slope / intercept)}
    got = rope_frequencies(dataclasses.replace(cfg, rope_scaling=scaling)).double()
    if not torch.allclose(got, plain / f, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: 'rope_freqs.weight' does not follow Llama-3's RoPE scaling recipe")
    return scaling


# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> how its regexes split text, as `tokenizers` steps.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),  # then GPT-2's
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: split_then_bytes(LLAMA3_SPLIT),
    "qwen2": lambda: split_then_bytes(QWEN2_SPLIT),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types for special and added (matched whole) tokens


def split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gguf_tokenizer(src: GGUFSource) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF describes (vocabulary, merges, pre-tokenizer, special tokens), built as
    the `tokenizer.json` of the model's HF release would be. Llama-3's BPE looks whole words up before merging."""
    kind, pre = src.field("tokenizer.ggml.model"), src.field("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{src.path}: tokenizer {kind!r} is not supported from GGUF (only byte-level BPE, 'gpt2'); "
                         f"convert the model's HF directory instead")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{src.path}: pre-tokenizer {pre!r} is not supported (known: "
                         f"{', '.join(GGUF_PRE_TOKENIZERS)})")
    tokens = src.field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in src.field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = src.field("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types, strict=True) if kind == GGUF_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types, strict=True) if kind == GGUF_USER_DEFINED])
    bos = src.field("tokenizer.ggml.bos_token_id", -1)
    if src.field("tokenizer.ggml.add_bos_token", False) and bos >= 0:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_gguf_tokenizer(src: GGUFSource, out: Path, rows: int):
    """Write tokenizer.json plus the files that carry its special tokens and chat template, laid out as
    transformers' save_pretrained lays them out. Refuses a vocabulary larger than the embedding table's `rows`."""
    tok = gguf_tokenizer(src)
    if tok.get_vocab_size(with_added_tokens=True) > rows:
        raise ValueError(f"{src.path}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, but "
                         f"the embedding table 'token_embd.weight' has only {rows} rows")
    tokens = src.field("tokenizer.ggml.tokens")
    special = {name: tokens[src.field(f"tokenizer.ggml.{key}_token_id")]
               for name, key in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")]
               if f"tokenizer.ggml.{key}_token_id" in src.fields}
    ids = {f"{name}_token_id": tok.token_to_id(t) for name, t in special.items() if name != "unk"}
    stop = [src.field(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")
            if f"tokenizer.ggml.{key}_token_id" in src.fields]  # end of text, of turn, of message
    config = {f"{name}_token": t for name, t in special.items()} | {
        "add_bos_token": src.field("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": src.field("tokenizer.ggml.add_eos_token", False)}
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ids | {"eos_token_id": sorted(set(stop))}, indent=2) + "\n")
    if "tokenizer.chat_template" in src.fields:
        (out / "chat_template.jinja").write_text(src.field("tokenizer.chat_template"))


def write_lm_tokenizer(lm: "Path | GGUFSource", out: Path, rows: int) -> str:
    """Put the LM's tokenizer beside the weights (built from a GGUF's metadata, or the HF dir's own files) and
    return the chat template they name. Refuses a vocabulary larger than the embedding table's `rows`."""
    if isinstance(lm, GGUFSource):
        write_gguf_tokenizer(lm, out, rows)
    elif any((lm / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):  # else a bare test model
        tokenizer = load_tokenizer(lm)
        tokenizer.check_fits(rows)
        tokenizer.save(out)
    return detect_template(out)


def take_gguf_lm(plan: "Plan", src: GGUFSource):
    mapping = expand(GGUF_MAP, "lm.", "", plan.cfg.lm.n_layers)
    plan.take(src, mapping)
    if not plan.cfg.lm.tie_embeddings:
        plan.take(src, {"lm.head.weight": "output.weight"})
    plan.check_all_used(src, "", [r"^rope_freqs\.weight$"])  # read into the config (llama3 RoPE scaling)
    taken = {k: v for k, v in mapping.items() if k in plan.recipes}  # a Llama's file has no q/k/v biases
    plan.q4_blocks = gguf_q4_blocks(src, taken)


def gguf_q4_blocks(src: GGUFSource, mapping: dict) -> dict:
    """Our weight key -> callable() -> the file's own Q4 blocks [q, scales, mins], rows stacked for our fused
    layers (q, k, v; gate, up), for each weight whose parts are all Q4_0/Q4_1. An int4 layer takes these as
    stored: a lossless copy, where rounding the dequantized weights again would not be (Q4_0's blocks)."""
    blocks = {}
    for ours, theirs in mapping.items():
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        if all(src.is_q4(name) for name in names):
            blocks[ours] = lambda names=names: [torch.cat(x) for x in zip(*map(src.int4_blocks, names), strict=True)]
    return blocks


# ----------------------------------------------------------------------------- building a checkpoint


class Plan:
    """Everything needed to write one of our checkpoints: the config, and each tensor's recipe."""

    def __init__(self, cfg: VLMConfig):
        self.recipes: dict = {}  # our key -> callable(meta: bool) -> tensor
        self.used: set[str] = set()  # their keys consumed so far
        self.q4_blocks: dict | None = None  # a GGUF LM: our weight key -> callable() -> its Q4 blocks as stored
        self.last_layer = (None, None, None)  # (name, meta, parts) of the quantized layer made last (layer_parts)
        self.set_config(cfg)

    def set_config(self, cfg: VLMConfig):
        """The config, its model built on `meta` (structure only, no weights), and what that model stores: our key
        -> an empty tensor of the shape we need (a tied head is the embedding table, not stored twice)."""
        self.cfg = cfg
        with torch.device("meta"):
            self.model = VLM(cfg)
        self.expected = {k: v for k, v in self.model.state_dict().items() if k not in self.model.tied_keys()}

    def take(self, src: Source, mapping: dict):
        """Use `mapping` for the keys this model has (biases, CLS or post-norm only where the config has them)."""
        for ours, theirs in mapping.items():
            if ours not in self.expected:
                continue
            self.used.update(theirs if isinstance(theirs, tuple) else [theirs])
            if isinstance(theirs, tuple):
                self.recipes[ours] = lambda meta, t=theirs: torch.cat([src.get(k, meta) for k in t])
            else:
                self.recipes[ours] = lambda meta, t=theirs: src.get(t, meta)

    def check_all_used(self, src: Source, prefix: str, ignore=()):
        """Refuse tensors under `prefix` that nothing consumed: an unknown layout must not convert silently.

        `ignore` lists patterns of tensors dropped on purpose (stale buffers, heads LLaVA never uses).
        """
        ignore = STALE_BUFFERS + tuple(ignore)
        left = [k for k in src.keys() if k.startswith(prefix) and k not in self.used
                and not any(re.search(p, k) for p in ignore)]
        if left:
            raise KeyError(f"tensor '{left[0]}' has no place in our model (unsupported variant?)"
                           f"{f' and {len(left) - 1} more' if len(left) > 1 else ''}")

    def write(self, out: Path, dtype=None, quantize=None) -> str:
        """Write config.json and model.safetensors, one tensor at a time. `dtype` casts the floating-point weights;
        `quantize` ("int8" / "int4") then stores the LM's linear layers quantized, each made from its cast weight."""
        n_params = sum(t.numel() for t in self.expected.values())
        if dtype is not None:
            self.cast(dtype)
        note = f"; the LM's linear layers are {quantize}{self.quantize(quantize)}" if quantize else ""
        expected = self.expected
        missing, extra = sorted(expected.keys() - self.recipes.keys()), sorted(self.recipes.keys() - expected.keys())
        if missing or extra:
            raise KeyError(f"weight map mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        specs = {}
        for k in sorted(expected):
            specs[k] = self.recipes[k](True)
            if specs[k].shape != expected[k].shape:
                raise ValueError(f"tensor '{k}': checkpoint gives shape {tuple(specs[k].shape)}, config expects "
                                 f"{tuple(expected[k].shape)}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        write_safetensors(out / "model.safetensors", specs, lambda k: self.recipes[k](False))
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in specs.values()})
        return (f"wrote {out}: {n_params / 1e6:.1f}M parameters, {'/'.join(dtypes)}, "
                f"{self.cfg.num_image_tokens} image tokens per {'tile' if self.cfg.grid_pinpoints else 'image'}{note}")

    def cast(self, dtype: torch.dtype):
        """Cast each floating-point tensor to `dtype` as it is made."""
        def cast(t):
            return t.to(dtype) if t.is_floating_point() else t
        for k, recipe in self.recipes.items():
            self.recipes[k] = lambda meta, r=recipe: cast(r(meta))

    def quantize(self, kind: str) -> str:
        """Store the LM's linear layers as `kind` (quantize.py), as VLM.quantize would make them, but layer by
        layer while writing: each layer's float weight is made once, rounded, and dropped, so the float model is
        never built and the peak RAM is a few copies of the largest tensor, not the model (docs/perf.md). For int4,
        a layer whose GGUF parts are all Q4_0/Q4_1 takes the file's blocks as stored. Returns a note for the user."""
        self.set_config(dataclasses.replace(self.cfg, quantize=kind))  # the config records it: loads strictly
        int4 = taken = 0
        for name, layer in self.model.named_modules():
            if not isinstance(layer, (Int8Linear, Int4Linear)):
                continue
            tied = name == "lm.head" and self.cfg.lm.tie_embeddings
            weight = self.recipes["lm.tok_embed.weight" if tied else f"{name}.weight"]  # the float weight's recipe
            blocks = None
            if isinstance(layer, Int4Linear):
                int4 += 1
                if self.q4_blocks is not None and layer.group_size == 32:  # llama.cpp's Q4 blocks are 32 wide
                    blocks = self.q4_blocks.get(f"{name}.weight")
                taken += blocks is not None
            parts = self.layer_parts(name, layer, weight, blocks)
            for part in ("weight", "scales", "mins") if isinstance(layer, Int4Linear) else ("weight", "scales"):
                self.recipes[f"{name}.{part}"] = lambda meta, p=part, parts=parts: parts(meta)[p]
        if not int4 or self.q4_blocks is None:
            return ""
        return f"; {taken} of {int4} int4 layers are the file's own Q4 blocks, the rest rounded to nearest"

    def layer_parts(self, name: str, layer: torch.nn.Module, weight, blocks):
        """One quantized layer's tensors as a recipe, meta -> {part: tensor}. Its keys are written one after
        another, so the last layer's parts are kept: its float weight is made and rounded once, not once per key."""
        def parts(meta: bool) -> dict:
            if self.last_layer[:2] != (name, meta):
                self.last_layer = (name, meta, quantized_parts(layer, weight, None if meta else blocks, meta))
            return self.last_layer[2]
        return parts


def quantized_parts(layer: torch.nn.Module, weight, blocks, meta: bool) -> dict:
    """The tensors an Int8Linear or Int4Linear stores, made from its float weight `weight(meta)` as from_linear
    makes them; an int4 layer with `blocks` (callable() -> the file's [q, scales, mins]) takes those instead,
    without making the float weight at all. Scales and mins are held in the float weight's dtype."""
    if isinstance(layer, Int8Linear):
        q, scales = quantize_weight(weight(meta))
        return {"weight": q, "scales": scales}
    dtype = weight(True).dtype  # reads no data
    q, scales, mins = blocks() if blocks else quantize_int4_weight(weight(meta), layer.group_size)
    return {"weight": pack_nibbles(q), "scales": scales.to(dtype), "mins": mins.to(dtype)}


def add_image_token_row(plan: Plan):
    """Append one row for the <image> placeholder (as llava-hf does), initialised to the mean row."""
    for key in ("lm.tok_embed.weight", "lm.head.weight"):
        if key in plan.recipes:
            base = plan.recipes[key]
            plan.recipes[key] = lambda meta, b=base: _append_mean_row(b(meta))


def _append_mean_row(t):
    if t.is_meta:
        return torch.empty(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype, device="meta")
    return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype)])


def take_vision_tower(plan: Plan, src: Source):
    """A standalone tower dir: CLIPModel / SiglipModel (text side ignored) or a bare vision model."""
    prefix = vision_prefix(src, "")
    plan.take(src, expand(VIT_MAP, "vision.", prefix, plan.cfg.vision.depth))
    plan.check_all_used(src, prefix, VISION_DROPPED)


def fresh_part(plan: Plan, prefix: str, module: torch.nn.Module, dtype):
    """Recipes for a part that starts from its own random init instead of a checkpoint."""
    for k, v in module.to(dtype).state_dict().items():
        plan.recipes[prefix + k] = lambda meta, v=v: v.to("meta") if meta else v


def from_towers(vision: "Path | VLMConfig", lm: "Path | GGUFSource", projector: str, seed: int) -> Plan:
    """A new VLM from a vision tower and a language model (an HF dir or an opened GGUF file); only the projector
    is new. `vision` may instead be a preset's config: its tower is then new too, random weights to train from
    scratch in front of the pretrained LM (e.g. the tiny 48 px tower for ShapesWorld)."""
    fresh_tower = isinstance(vision, VLMConfig)
    vision_cfg = vision.vision if fresh_tower else vit_config_from_hf(read_config(vision))
    gguf_src = lm if isinstance(lm, GGUFSource) else None
    lm_cfg = gguf_src.llama_config() if gguf_src else llama_config_from_hf(read_config(lm))
    vocab = lm_cfg.vocab_size
    lm_cfg.vocab_size += 1  # the placeholder gets the next id
    if fresh_tower:  # the preset says which features feed its projector
        feature_layer, drop_cls = vision.feature_layer, vision.drop_cls
    else:
        feature_layer, drop_cls = -2 if vision_cfg.class_token else -1, vision_cfg.class_token
    cfg = VLMConfig(vision_cfg, lm_cfg, ProjectorConfig(projector), image_token_id=vocab,
                    feature_layer=feature_layer, drop_cls=drop_cls)
    plan = Plan(cfg)
    if not fresh_tower:
        take_vision_tower(plan, Source.from_dir(vision))
    if gguf_src:
        take_gguf_lm(plan, gguf_src)
    else:
        lsrc = Source.from_dir(lm)
        body, head = lm_prefixes(lsrc, [("model.", "lm_head.weight"), ("", "lm_head.weight")])
        plan.take(lsrc, expand(LLAMA_MAP, "lm.", body, lm_cfg.n_layers))
        if not lm_cfg.tie_embeddings:
            plan.take(lsrc, {"lm.head.weight": head})
        plan.check_all_used(lsrc, body, [r"^lm_head\.weight$"])  # a tied checkpoint may still store the head
    add_image_token_row(plan)
    dtype = plan.recipes["lm.tok_embed.weight"](True).dtype
    torch.manual_seed(seed)
    fresh_part(plan, "projector.", Projector(cfg.projector, vision_cfg.width, lm_cfg.dim), dtype)
    if fresh_tower:
        fresh_part(plan, "vision.", VisionTransformer(vision_cfg), dtype)
    return plan


def from_llava(llava_dir: Path, vision_dir: Path | None) -> Plan:
    c = read_config(llava_dir)
    if c.get("model_type") in ("llava", "llava_next", "llava_onevision"):
        return from_llava_hf(llava_dir, c)
    if "mm_projector_type" in c or "mm_vision_tower" in c:
        return from_llava_original(llava_dir, c, vision_dir)
    raise ValueError(f"{llava_dir / 'config.json'}: not a LLaVA config (model_type {c.get('model_type')!r})")


def from_llava_hf(llava_dir: Path, c: dict) -> Plan:
    """llava-hf layouts: legacy `language_model.model.*` and newer `model.language_model.*` + `lm_head`.

    LLaVA-NeXT adds anyres: its `image_grid_pinpoints` and the learned `image_newline`. LLaVA-OneVision adds
    `vision_aspect_ratio` ("anyres_max_9") and a video placeholder; its LM is usually Qwen2.
    """
    vision_cfg = vit_config_from_hf(c.get("vision_config") or LLAVA_DEFAULT_VISION)
    lm_cfg = llama_config_from_hf(c.get("text_config") or {})
    if c.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported projector_hidden_act {c['projector_hidden_act']!r}")
    layer = c.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    strategy = c.get("vision_feature_select_strategy", "default")
    next_ = c["model_type"] in ("llava_next", "llava_onevision")
    anyres_kw = dict(grid_pinpoints=c.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS)) if next_ else {}
    if c["model_type"] == "llava_onevision":
        ratio = re.fullmatch(r"anyres_max_(\d+)", c.get("vision_aspect_ratio", "anyres_max_9"))
        if not ratio:
            raise ValueError(f"vision_aspect_ratio {c['vision_aspect_ratio']!r}: only anyres_max_N is supported")
        anyres_kw |= dict(anyres_max=int(ratio[1]), video_token_id=c.get("video_token_index", 151647),
                          multi_image_tiles=False)  # OneVision tiles a sample's lone image only
    cfg = VLMConfig(vision_cfg, lm_cfg, ProjectorConfig("mlp2x_gelu"),
                    image_token_id=c.get("image_token_index", c.get("image_token_id", 32000)),
                    feature_layer=layer, drop_cls=strategy == "default", **anyres_kw)
    if not c.get("multimodal_projector_bias", True):
        raise ValueError("multimodal_projector_bias=false is not supported")
    plan = Plan(cfg)
    src = Source.from_dir(llava_dir)
    body, head = lm_prefixes(src, [("language_model.model.", "language_model.lm_head.weight"),
                                   ("model.language_model.", "lm_head.weight")])
    outer = "" if body.startswith("language_model.") else "model."  # legacy keys have no outer "model."
    plan.take(src, expand(VIT_MAP, "vision.", vision_prefix(src, outer + "vision_tower."), vision_cfg.depth))
    plan.take(src, expand(LLAMA_MAP, "lm.", body, lm_cfg.n_layers))
    if not lm_cfg.tie_embeddings:
        plan.take(src, {"lm.head.weight": head})
    plan.take(src, expand(LLAVA_HF_PROJECTOR_MAP, "projector.", outer + "multi_modal_projector.", 0))
    if next_:
        plan.take(src, {"image_newline": outer + "image_newline"})
    plan.check_all_used(src, "", VISION_DROPPED + (r"lm_head\.weight$",))
    return plan


def from_llava_original(llava_dir: Path, c: dict, vision_dir: Path | None) -> Plan:
    """The original LLaVA repo: Llama weights + `model.mm_projector.*` in pytorch_model*.bin (or mm_projector.bin)."""
    if vision_dir is None:
        raise ValueError("original LLaVA checkpoints do not include the vision tower: pass --vision CLIP_DIR")
    kind = c.get("mm_projector_type", "linear")
    if kind not in LLAVA_ORIG_PROJECTOR_MAP:
        raise ValueError(f"unsupported mm_projector_type {kind!r} (supported: {', '.join(LLAVA_ORIG_PROJECTOR_MAP)})")
    vision_cfg = vit_config_from_hf(read_config(vision_dir))
    lm_cfg = llama_config_from_hf({k: v for k, v in c.items() if not k.startswith("mm_")} | {"model_type": "llama"})
    vocab = lm_cfg.vocab_size
    lm_cfg.vocab_size += 1  # LLaVA used id -200 for <image>; we give it a real row
    cfg = VLMConfig(vision_cfg, lm_cfg, ProjectorConfig(kind), image_token_id=vocab,
                    feature_layer=c.get("mm_vision_select_layer", -2),
                    drop_cls=c.get("mm_vision_select_feature", "patch") == "patch")
    plan = Plan(cfg)
    vsrc, lsrc = Source.from_dir(vision_dir), Source.from_dir(llava_dir, exclude=("mm_projector.bin",))
    take_vision_tower(plan, vsrc)
    plan.take(lsrc, expand(LLAMA_MAP, "lm.", "model.", lm_cfg.n_layers))
    if not lm_cfg.tie_embeddings:
        plan.take(lsrc, {"lm.head.weight": "lm_head.weight"})
    add_image_token_row(plan)
    proj_src = lsrc
    if "model.mm_projector.0.weight" not in lsrc.keys() and "model.mm_projector.weight" not in lsrc.keys():
        if not (llava_dir / "mm_projector.bin").is_file():
            raise FileNotFoundError(f"{llava_dir}: no mm_projector weights in the checkpoint and no mm_projector.bin")
        proj_src = Source([llava_dir / "mm_projector.bin"])
    plan.take(proj_src, expand(LLAVA_ORIG_PROJECTOR_MAP[kind], "projector.", "model.", 0))
    # a finetuned LLaVA may carry its (frozen) tower too; we take the one given by --vision
    plan.check_all_used(lsrc, "", [r"^model\.vision_tower\.", r"^lm_head\.weight$"])
    return plan


# ----------------------------------------------------------------------------- export to transformers


def to_hf(ckpt: Path, out: Path) -> str:
    """Write our checkpoint as a llava-hf directory (legacy key layout, which every transformers version loads)."""
    model = VLM.from_pretrained(ckpt)
    cfg = model.cfg
    if cfg.projector.kind != "mlp2x_gelu":
        raise ValueError(f"transformers' LLaVA has only the mlp2x_gelu projector; this one is {cfg.projector.kind!r}")
    v, lm = cfg.vision, cfg.lm
    if lm.conv_kernel or lm.qk_norm or lm.logit_scale:  # their weights would be dropped, silently changing the model
        raise ValueError(f"transformers' Llama has no Canon layer, QK-norm or logit scale; this LM has conv_kernel="
                         f"{lm.conv_kernel}, qk_norm={lm.qk_norm}, logit_scale={lm.logit_scale}")
    if v.conv_stem:  # transformers' towers embed patches with one linear projection
        raise ValueError(f"transformers' CLIP and SigLIP have no conv stem; this tower has conv_stem={v.conv_stem}")
    if v.depth == 0:  # the patch embedding alone: transformers' LLaVA then finds no hidden state to read
        raise ValueError("transformers' LLaVA reads a vision hidden state that a tower with depth 0 does not give")
    siglip = not v.class_token
    act = {ours: theirs for theirs, ours in HF_ACT.items()}[v.act]
    vision_config = dict(model_type="siglip_vision_model" if siglip else "clip_vision_model", hidden_size=v.width,
                         intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
                         image_size=v.image_size, patch_size=v.patch_size, hidden_act=act, layer_norm_eps=v.norm_eps)
    rope = {"rope_type": "default"} if lm.rope_scaling is None else {
        "rope_type": lm.rope_scaling["type"], **{k: x for k, x in lm.rope_scaling.items() if k != "type"}}
    qwen2 = lm.attn_bias and not lm.proj_bias
    text_config = dict(model_type="qwen2" if qwen2 else "llama", vocab_size=lm.vocab_size, hidden_size=lm.dim,
                       intermediate_size=lm.hidden_dim, num_hidden_layers=lm.n_layers, num_attention_heads=lm.n_heads,
                       num_key_value_heads=lm.n_kv_heads, head_dim=lm.head_dim, rms_norm_eps=lm.norm_eps,
                       max_position_embeddings=lm.max_seq_len, attention_bias=lm.attn_bias,
                       tie_word_embeddings=lm.tie_embeddings, rope_theta=lm.rope_theta,
                       rope_scaling=rope, rope_parameters=rope | {"rope_theta": lm.rope_theta})
    next_ = bool(cfg.grid_pinpoints)
    onevision = cfg.anyres_max > 0 or cfg.video_token_id is not None or not cfg.multi_image_tiles
    kind = "llava_onevision" if onevision else "llava_next" if next_ else "llava"
    config = dict(architectures=[HF_ARCHITECTURES[kind]], model_type=kind, vision_config=vision_config,
                  text_config=text_config, image_token_index=cfg.image_token_id, projector_hidden_act="gelu",
                  vision_feature_layer=cfg.feature_layer, image_seq_length=cfg.num_image_tokens,
                  vision_feature_select_strategy="default" if cfg.drop_cls else "full",
                  multimodal_projector_bias=True, tie_word_embeddings=lm.tie_embeddings)
    if next_:
        config["image_grid_pinpoints"] = cfg.grid_pinpoints
    if onevision:
        if not cfg.anyres_max or cfg.video_token_id is None or cfg.multi_image_tiles:
            raise ValueError("transformers' OneVision needs anyres_max > 0, a video_token_id and "
                             "multi_image_tiles=False (it tiles a sample's lone image only)")
        config |= dict(vision_aspect_ratio=f"anyres_max_{cfg.anyres_max}", video_token_index=cfg.video_token_id)
    ours = model.state_dict()
    theirs = {}  # their key -> (our key, slice index within a fused tensor)
    maps = [(expand(VIT_MAP, "vision.", "vision_tower.vision_model.", v.depth)),
            (expand(LLAMA_MAP, "lm.", "language_model.model.", lm.n_layers)),
            (expand(LLAVA_HF_PROJECTOR_MAP, "projector.", "multi_modal_projector.", 0))]
    for mapping in maps:
        for our_key, their_key in mapping.items():
            if our_key in ours:
                theirs.update(split_fused(our_key, their_key, ours[our_key], cfg))
    if not lm.tie_embeddings:
        theirs["language_model.lm_head.weight"] = ours["lm.head.weight"]
    if next_:
        theirs["image_newline"] = ours["image_newline"]
    if not v.post_norm:  # transformers' CLIP always builds a pooled-output norm; LLaVA never reads it
        theirs["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(v.width)
        theirs["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(v.width)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    specs = {k: t.to("meta") for k, t in theirs.items()}
    write_safetensors(out / "model.safetensors", specs, theirs.__getitem__)
    if any((ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        load_tokenizer(ckpt).save(out)
    return f"wrote {out}: {sum(t.numel() for t in theirs.values()) / 1e6:.1f}M parameters, transformers LLaVA format"


HF_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                    "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def split_fused(our_key: str, their_key, tensor: torch.Tensor, cfg: VLMConfig) -> dict:
    """Undo our q/k/v and gate/up fusion: {their key: tensor}."""
    if not isinstance(their_key, tuple):
        return {their_key: tensor}
    if our_key.startswith("lm.") and ".attn.qkv." in our_key:
        lm = cfg.lm
        sizes = [lm.n_heads * lm.head_dim, lm.n_kv_heads * lm.head_dim, lm.n_kv_heads * lm.head_dim]
    else:
        sizes = [tensor.size(0) // len(their_key)] * len(their_key)
    return dict(zip(their_key, tensor.split(sizes), strict=True))


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Convert CLIP/SigLIP + Llama/Mistral, or LLaVA checkpoints, into vlm_from_scratch checkpoints "
                    "(config.json + model.safetensors + the LM's tokenizer.json or tokenizer.model), or export ours to "
                    "transformers' LLaVA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vision", type=Path, help="HF vision tower dir: CLIPModel, CLIPVisionModel, SiglipModel or "
                                                "SiglipVisionModel (also the tower for an original-LLaVA --llava)")
    p.add_argument("--fresh-vision", choices=list(PRESETS), metavar="PRESET",
                   help="instead of --vision: a from-scratch tower shaped as this preset's (random weights, e.g. "
                   "tiny: 48 px, 8 px patches, one block), to train with train.py --train vision,projector in front "
                   "of a pretrained --lm")
    p.add_argument("--lm", type=Path, help="HF language model dir (Llama-2/3, TinyLlama, Mistral, Vicuna, SmolLM2), "
                                            "or a llama.cpp .gguf file of a Llama-architecture model (any "
                                            "quantization the gguf package can dequantize)")
    p.add_argument("--projector", default="mlp2x_gelu", choices=["linear", "mlp2x_gelu", "pixel_shuffle"],
                   help="projector to initialise fresh when building from --vision + --lm")
    p.add_argument("--llava", type=Path, help="a llava-hf dir (any key layout), or an original LLaVA repo dir "
                                               "(pytorch_model*.bin [+ mm_projector.bin]; needs --vision)")
    p.add_argument("--to-hf", type=Path, metavar="CKPT",
                   help="export one of our checkpoints to transformers' LLaVA format")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast floating-point weights (default: keep the checkpoint's dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed for the freshly initialised projector (and tower)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the LM's linear layers as int8 with per-channel scales, or int4 in groups of 32 with "
                   "an int8 head (quantize.py): 4x / ~6x fewer bytes read per decoded token; the vision tower and "
                   "embeddings stay as they are. From a GGUF file, int4 takes its Q4_0/Q4_1 blocks as stored")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="chat template recorded in config.json for --vision + --lm or --llava (default: detected "
                   "from the LM's own chat template or special tokens: chatml for SmolLM2 / Qwen2.5, llama3, "
                   "mistral; else vicuna_v1)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.quantize and args.to_hf:
        p.error("--quantize writes our format; transformers' LLaVA cannot hold quantized layers (--to-hf)")
    try:
        if args.to_hf:
            print(to_hf(args.to_hf, args.out))
        elif args.llava:
            plan = from_llava(args.llava, args.vision)
            plan.cfg.template = args.template or write_lm_tokenizer(args.llava, args.out, plan.cfg.lm.vocab_size)
            print(plan.write(args.out, dtype, args.quantize))
        elif (args.vision or args.fresh_vision) and args.lm:
            if args.vision and args.fresh_vision:
                p.error("give --vision or --fresh-vision, not both")
            lm = GGUFSource(args.lm) if args.lm.is_file() else args.lm
            vision = preset(args.fresh_vision) if args.fresh_vision else args.vision
            plan = from_towers(vision, lm, args.projector, args.seed)
            plan.cfg.template = args.template or write_lm_tokenizer(lm, args.out, plan.cfg.image_token_id)
            print(plan.write(args.out, dtype, args.quantize))
        else:
            p.error("give --vision (or --fresh-vision) and --lm, or --llava, or --to-hf")
    except (OSError, ImportError, KeyError, ValueError, RuntimeError) as err:
        raise SystemExit(f"convert_weights: {err.args[0] if isinstance(err, KeyError) else err}") from None


if __name__ == "__main__":
    main()
