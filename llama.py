"""Llama: the decoder-only language model of a VLM.

Touvron et al. 2023 (Llama 1/2/3): pre-norm blocks with RMSNorm, rotary position embeddings (RoPE)
in the rotate-half layout transformers uses, grouped-query attention (GQA) and a SwiGLU MLP.
Mistral, Vicuna and TinyLlama share this architecture. A preallocated KV cache makes decoding cheap.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# SDPA learned to broadcast K/V heads itself (no copies) in torch 2.5, the release that added FlexAttention.
SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)
if SDPA_HAS_GQA:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    flex_attention_compiled = torch.compile(flex_attention)  # eager flex is a slow reference; compiled, a kernel
else:

    class BlockMask:  # torch < 2.5 has no FlexAttention: no mask is ever one of these
        pass


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None = dim // n_heads
    hidden_dim: int = 11008  # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "linear", "factor": f} or {"type": "llama3", ...}
    max_seq_len: int = 4096
    attn_bias: bool = False  # biases on q, k, v (Qwen2, and Llama's attention_bias)
    proj_bias: bool | None = None  # bias on the output projection; None = attn_bias (Llama), Qwen2 has none
    tie_embeddings: bool = False
    # Levers for learning in-context lookup from scratch; all off for converted checkpoints (transformers has none).
    conv_kernel: int = 0  # > 0: Canon layer (Allen-Zhu 2025), a causal depthwise conv mixing each attention input
    #                       with its conv_kernel - 1 predecessors, so recall heads need not first build that mixing
    qk_norm: bool = False  # RMSNorm on each head's q and k (OLMo 2): logits stay bounded at any learning rate
    logit_scale: float = 0.0  # > 0: a learnable per-head multiplier of q.k / sqrt(hs), starting here; a sharper
    #                           softmax than uniform gives the q/k weights gradient sooner (Hoffmann et al. 2024)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.proj_bias = self.attn_bias if self.proj_bias is None else self.proj_bias
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.conv_kernel < 0 or self.logit_scale < 0:
            raise ValueError(f"conv_kernel {self.conv_kernel} and logit_scale {self.logit_scale} must be >= 0")
        kind = (self.rope_scaling or {}).get("type", "default")
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {kind!r} (default, linear, llama3)")


# ----------------------------------------------------------------------------- helpers


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """The rotation speed of each pair of channels, (head_dim/2,), with optional context-extension scaling."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type", "default")
    if kind == "linear":  # stretch every wavelength: position p behaves like p / factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: stretch only the long wavelengths, blend the middle band
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelength, 1: short
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast."""
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd): rotate-half pairs channel i with i + hd/2
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hd/2}) channel pair by a position-dependent angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    """x / rms(x) * w. Computed in fp32: in bf16 the mean of squares loses too many bits."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past tokens, preallocated once for the whole generation (no per-step torch.cat).

    Fixed shapes also let torch.compile capture the decode step in a CUDA graph.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device, conv_dim=0):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # A Canon layer's inputs of past tokens (B, S, C): a new token mixes in its predecessors' (conv_kernel > 0).
        self.x = torch.zeros(batch, max_len, conv_dim, dtype=dtype, device=device) if conv_dim else None

    def update(self, slots, k, v):
        """Write k, v (B, nkv, T, hs) at cache slots (T,); return the whole cache (B, nkv, S, hs)."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def update_x(self, slots, x):
        """Write a Canon layer's input x (B, T, C) at cache slots (T,); return all of it (B, S, C)."""
        self.x.index_copy_(1, slots, x)
        return self.x


class CausalConv(nn.Module):
    """Canon layer (Allen-Zhu 2025): x_t + sum_j w_j * x_(t-j), j < kernel, per channel.

    It reads the same mask as attention, so a token never mixes in padding, another packed sample or the future.
    """

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(kernel, dim))  # (k, C); w_j multiplies the token j steps back

    def forward(self, x, mask=None, slots=None, history=None):
        """x (B, T, C). With a KV cache, history (B, S, C) holds every cached input (x already written at
        `slots`); mask is attention's (B, 1, T, S) bool or None (plain causal)."""
        if isinstance(mask, BlockMask):
            raise ValueError("a Canon layer needs an explicit mask, not a FlexAttention BlockMask")
        B, T, _ = x.shape
        source = x if history is None else history  # (B, S, C)
        slots = torch.arange(T, device=x.device) if slots is None else slots  # (T,)
        out = x
        for j in range(self.weight.size(0)):
            back = slots - j  # (T,) the slot j tokens earlier
            seen = (back >= 0).expand(B, T)  # (B, T)
            back = back.clamp(min=0)
            if mask is not None:
                seen = seen & mask[:, 0, torch.arange(T, device=x.device), back]  # may token t attend there?
            out = out + self.weight[j] * source[:, back] * seen[..., None]
        return out


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=cfg.attn_bias)  # q, k, v in one matmul
        self.proj = nn.Linear(q_dim, cfg.dim, bias=cfg.proj_bias)
        self.conv = CausalConv(cfg.dim, cfg.conv_kernel) if cfg.conv_kernel else None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.logit_scale = nn.Parameter(torch.full((cfg.n_heads, 1, 1), cfg.logit_scale)) if cfg.logit_scale else None
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, slots=None, need_weights=False):
        """x (B, T, C); mask (B, 1, T, S) bool, True = may attend, or None for plain causal, or a FlexAttention
        BlockMask (packed training on CUDA).

        With a cache, k/v are written at `slots` and attention reads the whole cache.
        """
        B, T, _ = x.shape
        if self.conv is not None:
            history = self.cache.update_x(slots, x) if self.cache is not None else None
            x = self.conv(x, mask, slots, history)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.logit_scale is not None:
            q = q * self.logit_scale  # (nh, 1, 1): every path below divides q.k by sqrt(hs); this multiplies it
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(slots, k, v)  # (B, nkv, S, hs)
        if isinstance(mask, BlockMask):
            y, att = self.attend_flex(q, k, v, mask), None
        elif need_weights or not SDPA_HAS_GQA:
            y, att = self.attend_plain(q, k, v, mask)
        else:
            y, att = self.attend_fast(q, k, v, mask), None
        y = y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, nh * hs)
        return self.proj(y), att

    def attend_fast(self, q, k, v, mask):
        """Fused SDPA kernel (flash / memory-efficient); enable_gqa shares each K/V head across its group."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )

    @torch.compiler.disable  # traced inside a compiled model, it gave a different loss (torch 2.13, CPU)
    def attend_flex(self, q, k, v, block_mask):
        """FlexAttention: the kernel skips every tile the BlockMask marks empty, so a row packed with several
        samples costs their own block-diagonal attention, not the whole T x T square an explicit mask costs."""
        return flex_attention_compiled(q, k, v, block_mask=block_mask, enable_gqa=self.n_heads != self.n_kv_heads)

    def attend_plain(self, q, k, v, mask):
        """The same maths written out, returning the attention weights (B, nh, T, S) for inspection.

        GQA without copies: query heads are grouped as (nkv, group) and K/V broadcast over the group.
        """
        B, nh, T, hs = q.shape
        S = k.size(2)
        q = q.view(B, self.n_kv_heads, nh // self.n_kv_heads, T, hs)  # (B, nkv, g, T, hs)
        att = (q @ k[:, :, None].transpose(-2, -1)) / math.sqrt(hs)  # (B, nkv, g, T, S)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # no cache: S == T
        att = att.masked_fill(~mask[:, None] if mask.dim() == 4 else ~mask, float("-inf"))
        att = att.softmax(dim=-1)
        y = att @ v[:, :, None]  # (B, nkv, g, T, hs)
        return y.reshape(B, nh, T, hs), att.reshape(B, nh, T, S)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, slots=None, need_weights=False):
        h, att = self.attn(self.attn_norm(x), cos, sin, mask, slots, need_weights)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), att


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_embed.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        """GPT-2 style init for training from scratch: N(0, 0.02), residual outputs scaled by depth."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("logit_scale"):
                nn.init.constant_(p, self.cfg.logit_scale)
            elif name.endswith("conv.weight"):
                nn.init.zeros_(p)  # a Canon layer starts as the identity and learns what to mix in
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def setup_cache(self, batch: int, max_len: int):
        p = self.tok_embed.weight
        for block in self.blocks:
            block.attn.cache = KVCache(batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, p.dtype, p.device,
                                       self.cfg.dim if self.cfg.conv_kernel else 0)

    def clear_cache(self):
        for block in self.blocks:
            block.attn.cache = None

    def forward(self, x, positions, mask=None, slots=None, need_weights=False):
        """x (B, T, C) input embeddings -> final hidden states (B, T, C), plus per-layer attention if asked.

        positions (B, T) feed RoPE; mask (B, 1, T, S) bool or None (causal); slots (T,) are KV-cache indices.
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        attentions = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x, att = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x, att = block(x, cos, sin, mask, slots, need_weights)
            attentions.append(att)
        x = self.norm(x)
        return (x, attentions) if need_weights else x
