"""Linear layers of the fast engine in three weight formats: fp32 (shared), bf16, int8 (per-channel).

GPT-2 stores its linear weights as Conv1D, [in, out]; `x @ W + b` reads them as they are, so fp32
needs no copy. bf16 and int8 are converted once into [out, in] for the kernels that want that layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rugpt.errors import UsageError


@dataclass
class PackedLinear:
    """y = x @ W + b for x [n, in] in fp32, whatever the stored format; returns fp32 [n, out]."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, transposed: bool = False) -> PackedLinear:
    """Pack a Conv1D weight [in, out] (or, with `transposed`, a Linear/embedding weight [out, in])."""
    weight = weight.detach()
    bias = bias.detach() if bias is not None else None
    if fmt == "fp32":
        return _fp32(weight, bias, transposed)
    out_in = weight if transposed else weight.t()
    if fmt == "bf16":
        return _bf16(out_in.contiguous().to(torch.bfloat16), bias)
    if fmt == "int8":
        return _int8(out_in, bias)
    raise UsageError(f"weight format {fmt!r} is unknown; use fp32, bf16 or int8")


def _fp32(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> PackedLinear:
    if transposed:
        return PackedLinear(lambda x: F.linear(x, weight, bias), weight.numel() * 4)
    if bias is None:
        return PackedLinear(lambda x: x @ weight, weight.numel() * 4)
    return PackedLinear(lambda x: torch.addmm(bias, x, weight), weight.numel() * 4)


def _bf16(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    bias16 = bias.to(torch.bfloat16) if bias is not None else None
    return PackedLinear(lambda x: F.linear(x.to(torch.bfloat16), weight, bias16).float(), weight.numel() * 2)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [out, in] ≈ q * scale[:, None]."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _int8(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    q, scale = quantize_int8(weight)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        return _int8_fbgemm(q, scale, bias)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale)
        return y + bias if bias is not None else y

    return PackedLinear(forward, q.numel() + scale.numel() * 4)


def _int8_fbgemm(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """fbgemm's dynamic int8 linear: the weight prepacked once, activations quantized per call (per tensor).

    At batch 1 on x86 it reads int8 weights near memory speed, 6x faster than fp32 on the 768x50264
    logits matrix, where aten._weight_int8pack_mm is 3x slower than fp32 (benchmarks/linear_kernels.py).
    """
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, yet they are fbgemm's only way in
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    packed = torch.ops.quantized.linear_prepack(qweight, bias)
    # reduce_range=False: full 8-bit activations (VNNI and AVX-512 do not saturate as plain AVX2 can).
    return PackedLinear(lambda x: torch.ops.quantized.linear_dynamic(x.contiguous(), packed, False),
                        q.numel() + scale.numel() * 4)
