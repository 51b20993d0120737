"""LoRA: low-rank adapters (Hu et al. 2021).

A frozen weight W gets a trainable update (alpha / r) * B A, with A (r, in) and B (out, r). B starts at zero,
so training starts exactly from the base model. LoRALinear *is* an nn.Linear, so the base weight keeps its
key (`...qkv.weight`) and the adapters sit beside it (`...qkv.lora_A`, `...qkv.lora_B`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LoRAConfig:
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("qkv", "proj", "gate_up", "down")  # names of the Linear layers to adapt


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # share, don't copy, the base parameters
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        p = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=p.dtype, device=p.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=p.dtype, device=p.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _replace(module: nn.Module, make):
    """Swap every child Linear for which make(name, linear) returns a module."""
    for name, child in module.named_children():
        new = make(name, child)
        if new is not None:
            setattr(module, name, new)
        else:
            _replace(child, make)


def apply_lora(module: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Freeze every parameter of `module`, then wrap the Linear layers named in `targets` with LoRA."""
    module.requires_grad_(False)
    targets = set(targets)
    found = []

    def make(name, child):
        if name in targets and type(child) is nn.Linear:
            found.append(name)
            return LoRALinear(child, r, alpha, dropout)
        return None

    _replace(module, make)
    if not found:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} found for LoRA")
    return module


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain nn.Linear layers (no inference overhead)."""
    _replace(module, lambda name, child: child.merged() if isinstance(child, LoRALinear) else None)
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: megabytes, where the model is gigabytes."""
    return {k: v for k, v in module.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
