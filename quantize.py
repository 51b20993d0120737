"""Weight-only quantization: int8 per output channel (gpt-fast's quantize.py) and int4 in groups (llama.cpp's Q4).

Decoding one token reads every weight of the LM once, so on a CPU its speed is set by weight bytes, not FLOPs;
int8 reads 4x fewer than fp32, int4 about 7x fewer. Int8Linear gives each output row w the scale s = max|w| / 127
and stores round(w / s), so y = (x @ q^T) * s. Int4Linear cuts each row into groups of 32 inputs, each with its
own scale and minimum, w = q * scale + min with q in 0..15: the layout of llama.cpp's Q4_1 blocks, so a GGUF file's
4-bit weights are taken over as they are (convert_weights.py). Activations stay in float (weight-only). Both swap
in for nn.Linear the way lora.LoRALinear does, and keep the key `...qkv.weight` with `...qkv.scales` beside it.
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
    return swap_linears(module, Int8Linear.from_linear, skip)


def swap_linears(module: nn.Module, make, skip=()) -> nn.Module:
    """Replace every nn.Linear child in `module` (not named in `skip`) with make(linear), in place."""
    skip = set(skip)
    found = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in skip:
                setattr(parent, name, make(child))
                found.append(name)
    if not found:
        raise ValueError(f"no nn.Linear to quantize in {type(module).__name__} (skipping {sorted(skip)})")
    return module


# ----------------------------------------------------------------------------- int4, in groups

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 kernels take
HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")  # CPU; CUDA has _weight_int4pack_mm


def quantize_int4_weight(weight: torch.Tensor, group_size: int = 32):
    """(out, in) float -> q (out, in) uint8 in 0..15, scales and mins (out, in / group_size): round to nearest,
    each group's min and max mapped to 0 and 15, so w ~ q * scale + min (llama.cpp's Q4_1 rule)."""
    rows, cols = weight.shape
    g = weight.detach().float().reshape(rows, cols // group_size, group_size)  # (out, groups, G)
    mins = g.amin(dim=2)
    scales = ((g.amax(dim=2) - mins) / 15).clamp(min=1e-12)  # a constant group keeps a finite scale
    q = torch.round((g - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(rows, cols), scales.to(weight.dtype), mins.to(weight.dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in / 2) uint8, even inputs in the high nibble (as torch's CUDA packer wants)."""
    return q[:, ::2] << 4 | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) values 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1)


class Int4Linear(nn.Module):
    """A frozen nn.Linear with 4-bit weights in groups along the input: `weight` (out, in / 2), two per byte;
    `scales` and `mins` (out, in / group_size); w = q * scale + min. These buffers are what a checkpoint holds;
    pack() makes the fused kernel's own copy (its layout differs between CPU and CUDA) after loading or moving."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32, device=None,
                 dtype=torch.float32):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES or in_features % group_size:
            raise ValueError(f"int4 groups of {group_size} do not fit {in_features} inputs (torch's kernels take "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))} that divide the inputs)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("mins", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("packed", None, persistent=False)  # the kernel's copy, made by pack()
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.fused = HAS_INT4_KERNEL  # False: the readable dequantize-then-matmul path

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        p = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, p.device, p.dtype)
        q, layer.scales, layer.mins = quantize_int4_weight(p, group_size)
        layer.weight = pack_nibbles(q)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer.pack()

    def pack(self) -> "Int4Linear":
        """The fused kernel's copy. torch's int4 kernels compute w = (q - 8) * scale + zero with bf16 scales and
        zeros, so zero = min + 8 scale; on CPU they want a multiple of 16 rows, so the copy is padded with zeros."""
        if self.weight.is_meta:  # built to be loaded into: pack after loading
            return self
        pad = -self.out_features % 16
        scales, mins = F.pad(self.scales.float(), (0, 0, 0, pad)), F.pad(self.mins.float(), (0, 0, 0, pad))
        scales_and_zeros = torch.stack([scales, mins + 8 * scales], dim=2).transpose(0, 1)  # (groups, out + pad, 2)
        self.scales_and_zeros = scales_and_zeros.contiguous().to(KERNEL_DTYPE)
        q = F.pad(self.weight, (0, 0, 0, pad))  # (out + pad, in / 2)
        if q.is_cuda:  # inner k-tiles: the largest of 8, 4, 2 whose 16-wide tiles divide the inputs
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(q, tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q).int(), 1)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.pack()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(device) moves the stored weights; the kernel's copy is made anew
        return self.pack()

    def forward(self, x):
        y = self.forward_fused(x) if self.fused else self.forward_plain(x)
        return y if self.bias is None else y + self.bias

    def forward_fused(self, x):
        """One kernel reads the packed 4-bit weight group by group. Like the int8 one, it is fast only for bf16
        activations (fp32 ran ~20x slower on this CPU), so activations, scales, zeros and outputs are bf16. Unlike
        the int8 kernel, inductor compiles this call as it is (the bf16 scales are made once, by pack())."""
        x2d = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (N, in)
        kernel = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = kernel(x2d, self.packed, self.group_size, self.scales_and_zeros)[:, : self.out_features]
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (..., out)

    def forward_plain(self, x):
        """The same maths written out: dequantize the whole weight, then an ordinary matmul."""
        return F.linear(x, self.dequantize().to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32: q * scale + min, group by group."""
        q = unpack_nibbles(self.weight).view(self.out_features, -1, self.group_size).float()  # (out, groups, G)
        return (q * self.scales.float()[..., None] + self.mins.float()[..., None]).flatten(1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def quantize_int4(module: nn.Module, group_size: int = 32, skip=()) -> nn.Module:
    """Replace every nn.Linear in `module`, except those named in `skip`, with an Int4Linear of its weight
    (round to nearest in groups of `group_size` inputs). On the `meta` device it only changes the structure."""
    return swap_linears(module, lambda linear: Int4Linear.from_linear(linear, group_size), skip)


def quantize_lm(lm: nn.Module, kind: str, group_size: int = 32) -> nn.Module:
    """A language model's linear layers at `kind`, "int8" or "int4". An int4 LM keeps its output layer `head` at
    int8: in 4-bit groups it alone cut top-1 agreement with fp32 from 96% to 83% on SmolLM2 (docs/perf.md)."""
    if kind == "int4":
        quantize_int4(lm, group_size, skip=("head",))
    return quantize_int8(lm)  # for int4, only the head is still an nn.Linear
