"""Projectors: map vision features into the language model's embedding space.

`linear` is LLaVA-1 (Liu et al. 2023), `mlp2x_gelu` is LLaVA-1.5 (Liu et al. 2024), and `pixel_shuffle`
(Idefics3, nanoVLM) folds each r x r block of neighbouring patches into one token, cutting tokens by r^2.
"""

from dataclasses import dataclass

import torch.nn as nn

KINDS = ("linear", "mlp2x_gelu", "pixel_shuffle")


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"
    shuffle_factor: int = 2  # r, for pixel_shuffle only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown projector {self.kind!r}; choose from {', '.join(KINDS)}")

    def num_tokens(self, num_patches: int) -> int:
        return num_patches // self.shuffle_factor**2 if self.kind == "pixel_shuffle" else num_patches


def pixel_shuffle(x, r: int):
    """(B, P, C) patch grid -> (B, P / r^2, r^2 C): each r x r neighbourhood becomes one wider token."""
    B, P, C = x.shape
    g = int(P**0.5)
    if g * g != P or g % r:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by {r}, got {P} patches")
    x = x.view(B, g // r, r, g // r, r, C)  # (B, gh, r, gw, r, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, r, r, C)
    return x.reshape(B, P // r**2, r * r * C)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        elif cfg.kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim * cfg.shuffle_factor**2, out_dim))

    def forward(self, x):
        """(N, P, C_vision) -> (N, num_tokens, C_lm)"""
        if self.cfg.kind == "pixel_shuffle":
            x = pixel_shuffle(x, self.cfg.shuffle_factor)
        return self.net(x)
