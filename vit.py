"""Vision Transformer: the image encoder of a VLM.

One module covers both towers LLaVA-style models use, chosen by the config:
CLIP (Radford et al. 2021: class token, pre-norm, quick_gelu) and
SigLIP (Zhai et al. 2023: no class token, patch bias, gelu_tanh, post-norm).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"  # quick_gelu (CLIP) | gelu_tanh (SigLIP) | gelu
    norm_eps: float = 1e-5
    class_token: bool = True  # CLIP prepends a learned CLS token
    patch_bias: bool = False  # SigLIP's patch conv has a bias, CLIP's does not
    pre_norm: bool = True  # CLIP's `pre_layrnorm` before the first block
    post_norm: bool = False  # SigLIP normalises the final output
    # 3x3 stride-2 conv + GELU layers (their output channels) before the patch embedding, which then spans the
    # rest of the patch (Xiao et al. 2021, "Early convolutions help transformers see better"): a learned local
    # encoder that sees each patch's shapes whole; () = CLIP's and SigLIP's single linear patch projection
    conv_stem: tuple[int, ...] = ()
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.patch_size % 2 ** len(self.conv_stem):
            raise ValueError(f"patch_size {self.patch_size} is not a multiple of the conv stem's stride "
                             f"{2 ** len(self.conv_stem)} ({len(self.conv_stem)} stride-2 layers)")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown act {self.act!r}; choose from {sorted(ACTIVATIONS)}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.conv_stem = tuple(self.conv_stem)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


def siglip_config(**kw) -> ViTConfig:
    siglip = dict(act="gelu_tanh", norm_eps=1e-6, class_token=False, patch_bias=True, pre_norm=False,
                  post_norm=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return ViTConfig(**(siglip | kw))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: every patch sees every patch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)  # q, k and v in one matmul
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v; llama.py spells it out
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions with GELU: each halves the image and widens the channels. No BatchNorm, so a
    sample's features never depend on the rest of its batch."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        ins = (3,) + channels[:-1]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=2, padding=1) for i, o in zip(ins, channels, strict=True))
        for conv in self.convs:  # He init: PyTorch's default shrinks the signal ~3x per layer, leaving only biases
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        for conv in self.convs:
            x = F.gelu(conv(x))  # (B, C_i, H / 2^i, W / 2^i)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvStem(cfg.conv_stem) if cfg.conv_stem else None
        k = cfg.patch_size // 2 ** len(cfg.conv_stem)  # what the stem left of a patch: 1 x 1 after a full stem
        in_channels = cfg.conv_stem[-1] if cfg.conv_stem else 3
        self.patch_embed = nn.Conv2d(in_channels, cfg.width, k, stride=k, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.randn(cfg.width) * 0.02) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_patches + cfg.class_token, cfg.width) * 0.02)
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.post_norm else None

    def position_embedding(self, grid_h: int, grid_w: int):
        """The learned position table, bicubically resized when the image is not the trained size."""
        pos = self.pos_embed  # (1 + P, C) with a class token, else (P, C)
        if (grid_h, grid_w) == (self.cfg.grid, self.cfg.grid):
            return pos
        cls_pos, patch_pos = pos[: self.cfg.class_token], pos[self.cfg.class_token :]
        g, C = self.cfg.grid, pos.size(-1)
        patch_pos = patch_pos.reshape(1, g, g, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, C)  # (P', C)
        return torch.cat([cls_pos, patch_pos])

    def embed(self, pixels):
        x = pixels.to(self.patch_embed.weight.dtype)  # (B, 3, H, W)
        if self.stem is not None:
            x = self.stem(x)  # (B, C_stem, H / 2^n, W / 2^n)
        x = self.patch_embed(x)  # (B, C, gh, gw)
        B, C, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, P, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, 1, C), x], dim=1)  # (B, 1 + P, C)
        x = x + self.position_embedding(gh, gw)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def forward(self, pixels, feature_layer: int | None = None):
        """pixels (B, 3, H, W) -> (B, T, C) features.

        feature_layer=None returns the tower's final output (post-norm included, as SigLIP's
        `last_hidden_state`). An int picks a hidden state the way transformers' `hidden_states[i]`
        does (0 = embeddings, -1 = last block, no post-norm); LLaVA reads -2, so the last block is skipped.
        """
        x = self.embed(pixels)
        if feature_layer is None:
            n_blocks = self.cfg.depth
        else:
            n_blocks = feature_layer % (self.cfg.depth + 1)
        for block in self.blocks[:n_blocks]:
            x = block(x)
        if feature_layer is None and self.post_norm is not None:
            x = self.post_norm(x)
        return x
