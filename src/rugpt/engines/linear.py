"""Linear layers of the fast engine in five weight formats: fp32 (shared), bf16, fp16, int8 (per-channel), q4.

A decode step at small batch is bound by reading weights, so each format uses the CPU kernel that
reads its bytes fastest (measured by benchmarks/linear_kernels.py on the ruGPT-3 small shapes,
weights not in cache): fp32 and bf16 go through oneDNN with [out, in] weights (torch's own fp32
matrix-vector product runs on one core and reads about half as fast); fp16 and int8 go through
fbgemm's prepacked dynamic linear, with fp32 activations in and out. Where those kernels are missing
(a GPU, a non-x86 CPU) fp32/bf16/fp16 run on F.linear and int8 on aten's weight-only int8 matmul.

When rugpt's compiled decode step (engines/native.py) does the steps, it reads fp32 and bf16 `.weight`
itself, and packs int8 weights its own way (engines/native.py: int8_tiled). 4-bit blocks (q4) live in
engines/q4.py: the compiled kernel's products, or a dequantizing fallback without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rugpt.errors import UsageError

FORMATS = ("fp32", "bf16", "fp16", "int8", "q4")


@dataclass
class PackedLinear:
    """y = x @ W.T + b for x [n, in] in fp32, whatever the stored format; returns fp32 [n, out].

    `weight` ([out, in], or the native kernel's int8 tiles), `scale` (per output row) and `row_sums` (the
    native kernel's int8 only) and `bias` are the stored tensors where the compiled step reads them (None
    where only a kernel's packed copy exists). `forward_gelu`, where the kernel has one, is tanh-GELU(forward(x))
    in one pass: the activation applied to each output as it is computed.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int
    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    row_sums: torch.Tensor | None = None
    forward_gelu: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def tanh_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """tanh-GELU(self(x)), fused where the kernel can."""
        if self.forward_gelu is not None:
            return self.forward_gelu(x)
        return F.gelu(self.forward(x), approximate="tanh")


@dataclass
class BlockWeights:
    """One GPT-2 block as the fast engine holds it: two layer norms (weight, bias) and four linears."""

    ln1: tuple[torch.Tensor, torch.Tensor]
    qkv: PackedLinear
    proj: PackedLinear
    ln2: tuple[torch.Tensor, torch.Tensor]
    fc: PackedLinear
    out: PackedLinear


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> PackedLinear:
    """Pack a weight laid out [out, in]. fp32 keeps the tensor itself (no copy) when it is contiguous."""
    weight = weight.detach()
    bias = bias.detach() if bias is not None else None
    if fmt not in FORMATS:
        raise UsageError(f"weight format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    on_cpu = weight.device.type == "cpu"
    if fmt == "q4":  # 4-bit blocks (engines/q4.py); without the compiled kernel, dequantized on every call
        from rugpt.engines.q4 import pack_q4

        return pack_q4(weight, bias)
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        w, b = weight.to(dtype).contiguous(), _cast(bias, dtype)
        return _onednn(w, b) if on_cpu and _has_onednn() else _plain(w, b)
    # fbgemm (x86 CPUs) reads 16- and 8-bit weights fastest; elsewhere the same formats run on plain kernels
    fbgemm = on_cpu and "fbgemm" in torch.backends.quantized.supported_engines
    if fmt == "fp16":
        return _fp16_fbgemm(weight, bias) if fbgemm else _plain(weight.to(torch.float16).contiguous(),
                                                               _cast(bias, torch.float16))
    return _int8_fbgemm(weight, bias) if fbgemm else _int8_packed_mm(weight, bias)


def _cast(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return bias.to(dtype) if bias is not None else None


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), weight, bias).float()

    return PackedLinear(forward, weight.numel() * weight.element_size(), weight, None, bias)


def _onednn(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x.to(weight.dtype), weight, bias, "none", [], "").float()

    def forward_gelu(x: torch.Tensor) -> torch.Tensor:
        return linear(x.to(weight.dtype), weight, bias, "gelu", [], "tanh").float()

    return PackedLinear(forward, weight.numel() * weight.element_size(), weight, None, bias,
                        forward_gelu=forward_gelu)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [out, in] ≈ q * scale[:, None].

    Rows go a slice at a time, so the float temporaries stay small next to the weight (a 13B model's
    head, 50272 x 5120, would otherwise need three 1 GB fp32 copies on the way)."""
    out, n_in = weight.shape
    q = torch.empty(out, n_in, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out, device=weight.device)
    step = max(1, (1 << 22) // max(1, n_in))
    for first in range(0, out, step):
        rows = weight[first:first + step].float()
        part = rows.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[first:first + step] = torch.round(rows / part[:, None]).clamp(-127, 127)
        scale[first:first + step] = part
    return q, scale


def _fp16_fbgemm(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), bias)
    return PackedLinear(lambda x: torch.ops.quantized.linear_dynamic_fp16(x.contiguous(), packed), weight.numel() * 2)


def _int8_packed_mm(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """int8 weights through aten's weight-only int8 matmul: where fbgemm is missing (GPUs, non-x86 CPUs)."""
    q, scale = quantize_int8(weight)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale)
        return y + bias if bias is not None else y

    return PackedLinear(forward, q.numel() + scale.numel() * 4)


def _int8_fbgemm(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """fbgemm's dynamic int8 linear: the weight prepacked once, activations quantized per call (per tensor)."""
    q, scale = quantize_int8(weight)
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, yet they are fbgemm's only way in
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    packed = torch.ops.quantized.linear_prepack(qweight, bias)
    # reduce_range=False: full 8-bit activations (VNNI and AVX-512 do not saturate as plain AVX2 can).
    return PackedLinear(lambda x: torch.ops.quantized.linear_dynamic(x.contiguous(), packed, False),
                        q.numel() + scale.numel() * 4)
