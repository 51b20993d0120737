"""int8 weight-only quantization, as in gpt-fast's quantize.py: int8 weights with one float scale per output channel.

Decoding one token reads every weight of the LM once, so on a CPU its speed is set by weight bytes, not FLOPs;
int8 reads 4x fewer than fp32. Each output row w gets the scale s = max|w| / 127 and is stored as round(w / s),
so y = (x @ q^T) * s; activations stay in float (weight-only). Int8Linear swaps in for nn.Linear the way
lora.LoRALinear does, and keeps the key `...qkv.weight` (now int8) with `...qkv.scales` beside it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")  # the fused kernel, CPU and CUDA (torch >= 2.4)
KERNEL_DTYPE = torch.bfloat16  # the activations that kernel is fast for


@torch.library.custom_op("quantize::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fused kernel as an opaque op for torch.compile: inductor's own lowering of it (torch 2.13) asserts
    when the scales are computed in the graph (a dtype cast). Eager calls skip this wrapper's ~50 us."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


@int8_mm.register_fake
def _(x, weight, scales):
    return x.new_empty(x.size(0), weight.size(0))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and scales (out,), symmetric per output channel."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps a finite scale
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights (out, in) and float scales (out,). The scales set the output dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.fused = HAS_INT8_KERNEL  # False: the readable dequantize-then-matmul path

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        p = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, p.device, p.dtype)
        layer.weight, layer.scales = quantize_weight(p)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def _load_from_state_dict(self, *args, **kwargs):
        """After loading, copy any tensor that is not 64-byte aligned: the fused CPU kernel uses aligned AVX-512
        loads and crashed on weights memory-mapped from a safetensors file (offsets are aligned to 8 bytes)."""
        super()._load_from_state_dict(*args, **kwargs)
        for name, t in self._buffers.items():
            if t is not None and t.data_ptr() % 64:
                self._buffers[name] = t.clone()

    def forward(self, x):
        y = self.forward_fused(x) if self.fused else self.forward_plain(x)
        return y if self.bias is None else y + self.bias

    def forward_fused(self, x):
        """One kernel reads the int8 weight and scales each output, with no float copy of the weight. Its CPU
        kernel is vectorised for bf16 activations only (torch 2.13; fp32 ran 5x slower), so activations, scales
        and outputs are rounded to bf16: the error this adds is measured with int8's own (bench.py --what quality)."""
        x2d = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (N, in)
        kernel = int8_mm if torch.compiler.is_compiling() else torch.ops.aten._weight_int8pack_mm
        y = kernel(x2d, self.weight, self.scales.to(KERNEL_DTYPE))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (..., out)

    def forward_plain(self, x):
        """The same maths written out: dequantize the whole weight, then an ordinary matmul."""
        return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(module: nn.Module, skip=()) -> nn.Module:
    """Replace every nn.Linear in `module`, except those named in `skip`, with an Int8Linear of its weight.

    On the `meta` device this only changes the structure, so a quantized checkpoint can then be loaded strictly.
    """
    skip = set(skip)
    found = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in skip:
                setattr(parent, name, Int8Linear.from_linear(child))
                found.append(name)
    if not found:
        raise ValueError(f"no nn.Linear to quantize in {type(module).__name__} (skipping {sorted(skip)})")
    return module
