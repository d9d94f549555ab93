"""4-bit weights for the fast engine (`fast-q4`): blocks of 64 weights along the input, a scale and a minimum each.

A weight row is cut into blocks of `BLOCK` input columns; each block stores 4-bit codes q in 0..15, a scale d
and a minimum m (both fp16), and the weight is w = d * q + m: 4.5 bits a weight, as llama.cpp's q4_0. Why
this format, measured on the bundled model's held-out texts (20,000 tokens, every product's activations
quantized to 8 bits as the kernel does; fp32 perplexity 129.43): blocks of 64 with a minimum +1.25%, of 32
+0.79% (but 5 bits a weight, which at batch 1 is 11% more to read), symmetric q4_0 blocks of 32 +1.45%, of
64 +1.95%; int8 +0.08%. Keeping the output projection at int8 took q4 from +1.25% to +0.52%, which pays
where the head is a small share of the weights (q4_head_format).

The compiled kernels (native_step.c) multiply the unsigned codes by activations quantized per row to signed
8 bits with VNNI (`vpdpbusd` takes exactly unsigned x signed bytes), so each block's sum is
d * sum(q x) + m * sum(x), with sum(x) over the block computed once per input row. Codes are laid out in
tiles of 16 output rows (the 16 int32 lanes of one AVX-512 register), so one load serves 16 rows without a
horizontal sum, and the same layout feeds the prefill's products: one copy of the weights. The compiled
quantizer writes that layout straight from a (mapped, even transposed) fp32 weight, so a checkpoint packs
a layer at a time without fp32 temporaries. Where the kernel cannot run (no C compiler, no VNNI, a GPU) the
products dequantize a layer on every call and run on F.linear: slow, correct, and said once in the log.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from rugpt.engines.linear import PackedLinear

log = logging.getLogger(__name__)

BLOCK = 64  # input columns per scale and minimum
TILE = 16  # output rows per tile: the int32 lanes of one 512-bit register
CHUNK_K = 8  # input columns per 64-byte chunk of a tile: 16 rows × 4 columns in low nibbles, the next 4 in high
BITS_PER_WEIGHT = 4 + 2 * 16 / BLOCK
HEAD_INT8_SHARE = 0.10  # the output projection stays at int8 where it is at most this share of the linear weights


def pack_q4(weight: torch.Tensor, bias: torch.Tensor | None, kernel=None) -> PackedLinear:
    """A weight [out, in] quantized to q4 in the kernel's tiles (`.weight`, uint8), its products by the
    compiled kernel where it reads q4, else by dequantizing the layer on every call (slow, correct)."""
    weight = weight.detach()
    out, n_in = weight.shape
    if kernel is not None and weight.device.type == "cpu":  # the same codes, in C: seconds where torch takes minutes
        tiles = kernel_quantize_q4(kernel, weight)
    else:
        tiles = tile_q4(*quantize_q4(weight, pad_to=padded(n_in, BLOCK)))
    bias = bias.detach().float().contiguous() if bias is not None else None
    packed = PackedLinear(lambda x: x, tiles.numel(), tiles, None, bias)
    if kernel is not None and "q4" in kernel.formats and tiles.device.type == "cpu":
        from rugpt.engines.native import use_kernel

        use_kernel(kernel, packed, n_in, out)
    else:
        _say_dequantizing()
        packed.forward = functools.partial(_dequantized_product, tiles, out, n_in, bias)
    return packed


@functools.cache
def _say_dequantizing() -> None:
    log.warning("q4 products run by dequantizing each layer on every call (slow): rugpt's compiled kernel for "
                "4-bit weights needs a C compiler and a CPU with AVX-512 VNNI")


def _dequantized_product(tiles, out: int, n_in: int, bias, x: torch.Tensor) -> torch.Tensor:
    weight = dequantize_q4(*untile_q4(tiles, out))[:, :n_in]
    return F.linear(x.float(), weight, bias)


def kernel_quantize_q4(kernel, weight: torch.Tensor) -> torch.Tensor:
    """tile_q4(*quantize_q4(weight)) by the compiled quantizer, read in place (a transposed view is not copied)."""
    import ctypes

    if weight.dtype != torch.float32:
        weight = weight.float()
    out, n_in = weight.shape
    blocks = padded(n_in, BLOCK) // BLOCK
    tiles = torch.empty(padded(out, TILE) // TILE, blocks, BLOCK * TILE // 2 + 4 * TILE, dtype=torch.uint8)
    kernel.quantize_q4(ctypes.c_void_p(weight.data_ptr()), weight.stride(0), weight.stride(1), out, n_in,
                       ctypes.c_void_p(tiles.data_ptr()), torch.get_num_threads())
    return tiles


def q4_head_format(model, kernel=None) -> str:
    """The output projection's format under fast-q4: int8 where it is a small share of the weights (13B: 2%,
    so 8 bits cost little time and halve the head's share of the perplexity loss: +0.52% against +1.25% on
    the bundled model), else q4 (ruGPT-3 small: 31% of the weights; at int8 a token would read 24% more
    bytes). int8 needs the kernel's VNNI build and widths in whole 64-byte tiles."""
    config = model.config
    head = config.vocab_size * config.n_embd
    body = sum(conv.weight.numel() for block in model.transformer.h
               for conv in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    int8_ready = kernel is not None and "int8" in kernel.formats and config.n_embd % 64 == 0
    return "int8" if int8_ready and head <= HEAD_INT8_SHARE * (head + body) else "q4"


def quantize_q4(weight: torch.Tensor, block: int = BLOCK, mins: bool = True, pad_to: int | None = None):
    """Codes [out, in] (uint8, 0..15), scales and minimums [out, in / block] (fp16) with weight ≈ d * q + m.

    `in` must be a multiple of `block` (callers pad with zeros). With `mins` each block's grid spans its own
    range (widened to hold 0), then d and m are refitted by least squares for the codes chosen. A search over
    shrunk ranges (llama.cpp's make_qkx2_quants) lowered the squared error but not the perplexity (+1.50%
    against +1.25% without it on the bundled model) at 20x the time, so there is none. Without `mins` the
    block is symmetric, m = -8 d with d from the value largest in magnitude (llama.cpp's q4_0). Rows are
    quantized a slice at a time, so the temporaries stay small next to a 13B model's largest layer; with
    `pad_to`, each slice is padded with zero columns to that width first.
    """
    out, n_in = weight.shape
    step = max(1, (1 << 18) // max(1, n_in))  # a megabyte of fp32 a slice: temporaries stay small
    parts = [_quantize_rows(F.pad(weight[i:i + step].float(), (0, (pad_to or n_in) - n_in)), block, mins)
             for i in range(0, out, step)]
    return tuple(torch.cat(part) for part in zip(*parts, strict=True))


def _quantize_rows(weight: torch.Tensor, block: int, mins: bool):
    out, n_in = weight.shape
    w = weight.detach().float().reshape(out, n_in // block, block)
    if not mins:
        top = torch.gather(w, 2, w.abs().argmax(2, keepdim=True))
        d = (top / -8).to(torch.float16).float()
        q = torch.round(w / _nonzero(d)).add(8).clamp(0, 15)
        return _finish(q, d, -8 * d)
    low, high = w.amin(2, keepdim=True).clamp(max=0), w.amax(2, keepdim=True).clamp(min=0)
    q, d, m = _fit(w, low, (high - low) / 15)
    return _finish(q, d, m)


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


def _fit(w, low, d):
    """Codes for the grid low + d * q, then d and m refitted by least squares for those codes and rounded to
    fp16, and the codes again for those: native_step.c's quantize_block, sums in float64 as there."""
    q = torch.round((w - low) / _nonzero(d)).clamp(0, 15).double()
    w64, n = w.double(), w.shape[2]
    sq, sw, sqq, sqw = (t.sum(2, keepdim=True) for t in (q, w64, q * q, q * w64))
    det = n * sqq - sq * sq
    fit_d = torch.where(det > 0, (n * sqw - sq * sw) / torch.where(det > 0, det, 1), d.double())
    fit_m = torch.where(det > 0, (sw - fit_d * sq) / n, low.double())
    fit_d, fit_m = (t.float().to(torch.float16).float() for t in (fit_d, fit_m))
    q = torch.round((w - fit_m) / _nonzero(fit_d)).clamp(0, 15)
    return q, fit_d, fit_m


def _finish(q, d, m):
    out = q.shape[0]
    return (q.reshape(out, -1).to(torch.uint8), d.reshape(out, -1).to(torch.float16),
            m.reshape(out, -1).to(torch.float16))


def dequantize_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] that codes q with block scales d and minimums m stand for."""
    out, n_in = q.shape
    block = n_in // d.shape[1]
    blocks = q.float().view(out, -1, block)
    return (blocks * d.float()[:, :, None] + m.float()[:, :, None]).view(out, n_in)


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tile_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's layout [tiles, blocks, 576] (uint8): per tile of 16 rows, per block of 64 columns, 8 chunks of
    64 bytes (byte 4 r + j of chunk c: column 8 c + j of row r in the low nibble, column 8 c + 4 + j in the
    high one), then the 16 rows' d and the 16 rows' m as fp16: one sequential stream a tile. Rows are padded
    with zeros to whole tiles; `in` must be a multiple of the block."""
    out, n_in = q.shape
    blocks = n_in // BLOCK
    rows = padded(out, TILE)
    q = F.pad(q, (0, 0, 0, rows - out)).view(rows // TILE, TILE, blocks, BLOCK // CHUNK_K, 2, 4)
    # → [tile, block, chunk, row, 4 columns] for the low and the high halves of each chunk's 8 columns
    q = q.permute(0, 2, 3, 4, 1, 5)
    nibbles = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows // TILE, blocks, -1)
    scales = [F.pad(s, (0, 0, 0, rows - out)).view(rows // TILE, TILE, blocks).transpose(1, 2) for s in (d, m)]
    raw = [s.contiguous().view(torch.uint8).reshape(rows // TILE, blocks, TILE * 2) for s in scales]
    return torch.cat([nibbles, *raw], dim=2).contiguous()


def untile_q4(tiles: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, d, m as quantize_q4 gives them, back from tile_q4's layout."""
    n_tiles, blocks, _ = tiles.shape
    nibble_bytes = BLOCK * TILE // 2
    nibbles = tiles[:, :, :nibble_bytes].reshape(n_tiles, blocks, BLOCK // CHUNK_K, TILE, 4)
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=3)  # [tile, block, chunk, half, row, 4]
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(n_tiles * TILE, blocks * BLOCK)[:out]

    def scale(at: int) -> torch.Tensor:
        raw = tiles[:, :, at:at + 2 * TILE].contiguous().view(torch.float16)  # [tile, block, 16]
        return raw.transpose(1, 2).reshape(n_tiles * TILE, blocks)[:out]

    return q.contiguous(), scale(nibble_bytes), scale(nibble_bytes + 2 * TILE)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [n, in] as the kernel sees them: round(x / s) in -127..127 with s = max|x| / 127 per row."""
    scale = x.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x * (1 / scale)), scale  # times the inverse, as the kernel does: the same roundings


def reference_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with x quantized per row to 8 bits, as the compiled kernel computes it (for tests and for
    measuring quality): `weight` is the dequantized fp32 weight."""
    xq, scale = quantize_activations(x.float())
    y = (xq @ weight.T) * scale
    return y + bias if bias is not None else y
