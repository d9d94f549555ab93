"""The fast engine: a lean GPT-2 decode loop over a preallocated KV cache, with fp32, bf16, fp16 or int8 weights.

Why it is faster than transformers' `generate` on a CPU: at batch 1 a decode step is a chain of
matrix-vector products whose cost is reading the weights once; transformers adds cache objects,
logits processors and module dispatch around them. On a CPU with a C compiler a step is one call
into rugpt's compiled step (engines/native.py: fp32, bf16, and int8 where the CPU has VNNI), and so
is an extend by a few tokens (speculative decoding's check of its drafts). Other steps and prefills
are a flat sequence of torch ops on tensors prepared once, each linear layer on the kernel that
computes its weight format fastest (engines/linear.py; for 8- and 4-bit weights, and bf16 where the
CPU has AVX-512 BF16, the compiled kernel's blocked products), the attention on the compiled kernel's
where it applies. fp32 weights are
shared with the loaded transformers model (one copy in memory); bf16, fp16 and int8 weights are
converted once at start.

Rows live in cache slots 0..n-1, kept packed (a released row's slot takes the last row), so a step
over every active row reads the cache through views, without copies.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from rugpt.engines.base import DecodeEngine
from rugpt.engines.linear import BlockWeights, PackedLinear, pack_linear
from rugpt.engines.memory import release_file_pages
from rugpt.engines.native import (
    TILE_COLUMNS,
    Kernel,
    NativeStep,
    int8_tiled,
    prefill_attention,
    step_kernel,
    use_kernel,
)
from rugpt.engines.q4 import pack_q4, q4_head_format
from rugpt.errors import UsageError


class WeightFormat(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"
    q4 = "q4"  # blocks of 64 weights with a scale and a minimum (engines/q4.py)


_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_ACTIVATIONS = {
    **{name: lambda x: F.gelu(x, approximate="tanh") for name in _TANH_GELU},
    "gelu": F.gelu,
    "relu": F.relu,
}


def unsupported_reason(model) -> str | None:
    """Why the fast engine cannot run `model` (None when it can): it implements plain GPT-2 only."""
    config = model.config
    if getattr(config, "model_type", "") != "gpt2":
        return f"model type {config.model_type!r} is not GPT-2"
    if config.activation_function not in _ACTIVATIONS:
        return f"activation {config.activation_function!r} is not implemented"
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
        return "non-default attention scaling"
    if config.add_cross_attention:
        return "cross-attention"
    return None


def _pack(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, kernel: Kernel | None) -> PackedLinear:
    """Where the compiled step runs int8, it packs the weights in its own tiles and computes their prefill
    products too (engines/native.py), so there is no second, fbgemm copy; it computes bf16 prefills where its
    bf16 products beat oneDNN's."""
    if kernel is not None and fmt == WeightFormat.int8.value:
        return int8_tiled(kernel, weight, bias)
    if fmt == WeightFormat.q4.value:
        return pack_q4(weight, bias, kernel)
    packed = pack_linear(weight, bias, fmt)
    if kernel is not None and kernel.bf16_prefill and fmt == WeightFormat.bf16.value:
        use_kernel(kernel, packed, *reversed(packed.weight.shape))
    return packed


def _pack_conv1d(conv, fmt: str, kernel: Kernel | None) -> PackedLinear:
    """Pack a GPT-2 Conv1D (weight stored [in, out]) for kernels that read [out, in].

    For fp32 the module's own weight is re-laid out in place as [out, in] memory (the module keeps a
    transposed view, so it computes the same), which keeps one copy of the weights for the model and
    the engine. Other formats convert a copy and leave the module as it was. Either way the pages of a
    weight mapped from a safetensors file that the engine no longer reads are given back.
    """
    old = conv.weight.data
    out_in = old.t()
    if fmt == WeightFormat.fp32.value:
        if out_in.is_contiguous():  # laid out by an earlier engine: already shared
            return _pack(out_in, conv.bias, fmt, kernel)
        out_in = out_in.contiguous()
        conv.weight.data = out_in.t()
    packed = _pack(out_in, conv.bias, fmt, kernel)
    release_file_pages(old)  # no longer read by the engine (the transformers path would read it back from disk)
    return packed


def _merge_heads(attn: torch.Tensor) -> torch.Tensor:
    """torch's attention output [n, H, t, hd] as [n, t, H * hd]."""
    n, heads, t, head_dim = attn.shape
    return attn.transpose(1, 2).reshape(n, t, heads * head_dim)


class FastEngine(DecodeEngine):
    name = "fast"
    accepts_embeds = True
    shares_kv = True

    def __init__(self, model, context_length: int, max_rows: int = 16, weights: WeightFormat | str = "fp32"):
        reason = unsupported_reason(model)
        if reason:
            raise UsageError(f"the fast engine cannot run this model: {reason}; use engine='transformers'")
        config = model.config
        super().__init__(context_length, config.vocab_size, max_rows)
        self.weights = WeightFormat(weights)
        self.name = f"fast-{self.weights.value}"
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.layer_norm_epsilon
        self.act = _ACTIVATIONS[config.activation_function]
        self.tanh_gelu = config.activation_function in _TANH_GELU  # fused into the product where a kernel can
        transformer = model.transformer
        self.wte = transformer.wte.weight.detach()
        self.wpe = transformer.wpe.weight.detach()
        self.ln_f = (transformer.ln_f.weight.detach(), transformer.ln_f.bias.detach())
        fmt = self.weights.value
        kernel = self._native_kernel(config)
        self.layers = [
            BlockWeights(
                ln1=(block.ln_1.weight.detach(), block.ln_1.bias.detach()),
                qkv=_pack_conv1d(block.attn.c_attn, fmt, kernel),
                proj=_pack_conv1d(block.attn.c_proj, fmt, kernel),
                ln2=(block.ln_2.weight.detach(), block.ln_2.bias.detach()),
                fc=_pack_conv1d(block.mlp.c_fc, fmt, kernel),
                out=_pack_conv1d(block.mlp.c_proj, fmt, kernel),
            )
            for block in transformer.h
        ]
        self.lm_head = _pack(self.wte, None, q4_head_format(model, kernel) if fmt == "q4" else fmt, kernel)
        if self.weights != WeightFormat.fp32:
            release_file_pages(self.wte)  # token lookups read back only the rows they need
        shape = (max_rows, self.n_head, context_length, self.head_dim)
        device, dtype = self.wte.device, self.wte.dtype
        # torch.empty only reserves address space: pages are touched as positions fill up.
        self.k_cache = [torch.empty(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v_cache = [torch.empty(shape, device=device, dtype=dtype) for _ in self.layers]
        # prefills' attention by the compiled kernel where it applies (torch's takes a third of a q4 prefill)
        self.attention = kernel if kernel is not None and kernel.attention and self.head_dim % 16 == 0 else None
        self.native = None if kernel is None else NativeStep(
            kernel, wte=self.wte, wpe=self.wpe, ln_f=self.ln_f, lm_head=self.lm_head, layers=self.layers,
            k_cache=self.k_cache, v_cache=self.v_cache, n_head=self.n_head, eps=self.eps)
        self.slot_of: dict[int, int] = {}
        # Positions [0, written[slot]) of a slot hold finite numbers; beyond is torch.empty memory, maybe NaN.
        self.written = [0] * max_rows

    def _native_kernel(self, config) -> Kernel | None:
        """rugpt's compiled step (engines/native.py) where it applies: fp32 model on the CPU, tanh GELU, a weight
        format the build reads (int8: layer widths in whole 64-byte tiles); else None, and steps run as torch ops."""
        if self.wte.device.type != "cpu" or self.wte.dtype != torch.float32 or not self.tanh_gelu:
            return None
        widths = (config.n_embd, config.n_inner or 4 * config.n_embd)
        if self.weights == WeightFormat.int8 and any(width % TILE_COLUMNS for width in widths):
            return None
        kernel = step_kernel()
        return kernel if kernel is not None and self.weights.value in kernel.formats else None

    @torch.inference_mode()
    def _prefill(self, row: int, token_ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor:
        slot = self._take_slot(row)
        x = embeds.to(self.wte) if embeds is not None else self._embed(token_ids)
        return self._logits(self._forward(slot, 0, x)[-1:])[0]

    @torch.inference_mode()
    def _extend(self, row: int, token_ids: list[int], all_logits: bool) -> torch.Tensor:
        slot, start = self.slot_of[row], self.lengths[row]
        if self.native is not None and len(token_ids) <= self.native.max_rows:
            # a few tokens (drafts to check): one compiled step whose rows are this slot's next positions,
            # instead of ~60 torch ops that cost as much as 4 steps
            positions = list(range(start, start + len(token_ids)))
            self._mark_written([slot], [positions[-1]])
            logits = self.native([slot] * len(token_ids), positions, token_ids)
            return logits if all_logits else logits[-1]
        h = self._forward(slot, start, self._embed(token_ids))
        return self._logits(h) if all_logits else self._logits(h[-1:])[0]

    def _truncate(self, row: int, length: int) -> None:
        pass  # positions past the row's length are never read, and the next tokens overwrite them

    @torch.inference_mode()
    def _export_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        slot = self.slot_of[row]
        return torch.stack([torch.stack((k[slot, :, start:end], v[slot, :, start:end]))
                            for k, v in zip(self.k_cache, self.v_cache, strict=True)])

    @torch.inference_mode()
    def _open_row(self, row: int, kv: torch.Tensor) -> None:
        slot = self._take_slot(row)
        tokens = kv.shape[3]
        for (keys, values), k_cache, v_cache in zip(kv, self.k_cache, self.v_cache, strict=True):
            k_cache[slot, :, :tokens] = keys
            v_cache[slot, :, :tokens] = values
        self.written[slot] = max(self.written[slot], tokens)

    def _take_slot(self, row: int) -> int:
        slot = len(self.slot_of)  # rows are packed: the next free slot is the count of rows
        self.slot_of[row] = slot
        return slot

    def _embed(self, token_ids: list[int]) -> torch.Tensor:
        return self.wte[torch.tensor(token_ids, device=self.wte.device)]

    def _forward(self, slot: int, start: int, x: torch.Tensor) -> torch.Tensor:
        """Run input embeddings x [T, d] at positions start..start+T of `slot`, writing their keys and values into
        its cache after the `start` positions it holds; returns the last layer's hidden states [T, d]."""
        end = start + x.shape[0]
        self.written[slot] = max(self.written[slot], end)
        positions = torch.arange(start, end, device=self.wte.device)
        h = (x + self.wpe[positions]).unsqueeze(0)  # [1, T, d]
        # After cached positions the causal mask is offset: query t sees keys 0..start+t (is_causal would align
        # it to the top left, as if the queries began at position 0).
        mask = None if start == 0 else torch.arange(end, device=h.device)[None, :] <= positions[:, None]
        for i, layer in enumerate(self.layers):
            if self.attention is not None:
                h = self._mlp(layer, h, self._compiled_attention(i, layer, slot, start, h))
                continue
            q, k, v = self._qkv(layer, h)  # each [1, H, T, hd]
            self.k_cache[i][slot, :, start:end] = k[0]
            self.v_cache[i][slot, :, start:end] = v[0]
            if mask is None:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                keys, values = self.k_cache[i][slot : slot + 1, :, :end], self.v_cache[i][slot : slot + 1, :, :end]
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            h = self._mlp(layer, h, _merge_heads(attn))
        return h[0]

    def _compiled_attention(self, i: int, layer: BlockWeights, slot: int, start: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's attention for h [1, T, d] at positions start.. of `slot` by the compiled kernel, which reads the
        queries from the qkv product as they are and writes the heads side by side: [1, T, d]."""
        tokens = h.shape[1]
        qkv = self._qkv_rows(layer, h)
        heads = qkv.view(tokens, 3, self.n_head, self.head_dim)
        self.k_cache[i][slot, :, start:start + tokens] = heads[:, 1].transpose(0, 1)
        self.v_cache[i][slot, :, start:start + tokens] = heads[:, 2].transpose(0, 1)
        return prefill_attention(self.attention, qkv, self.k_cache[i][slot], self.v_cache[i][slot], start).view(h.shape)

    @torch.inference_mode()
    def _step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor:
        if self.native is not None:
            slots, positions = [self.slot_of[row] for row in rows], [self.lengths[row] for row in rows]
            self._mark_written(slots, positions)
            return self.native(slots, positions, token_ids)
        slots = [self.slot_of[row] for row in rows]
        order = sorted(range(len(rows)), key=slots.__getitem__)
        in_order = order == list(range(len(rows)))
        if not in_order:
            rows, token_ids, slots = ([seq[i] for i in order] for seq in (rows, token_ids, slots))
        device = self.wte.device
        position_list = [self.lengths[row] for row in rows]
        positions = torch.tensor(position_list, device=device)
        packed = slots == list(range(len(slots)))
        slot_index = slice(0, len(slots)) if packed else torch.tensor(slots, device=device)
        width = max(position_list) + 1
        ragged = min(position_list) + 1 != width
        mask = None
        if ragged:  # rows of different lengths: hide each row's unused positions
            mask = (torch.arange(width, device=device)[None, :] <= positions[:, None])[:, None, None, :]
            self._clear_unwritten(slots, width)
        self._mark_written(slots, position_list)
        # one position for every row (the usual case): a plain slice write instead of a scatter
        write_rows, write_at = (torch.tensor(slots, device=device), positions) if ragged else (slot_index, width - 1)
        h = (self.wte[torch.tensor(token_ids, device=device)] + self.wpe[positions]).unsqueeze(1)  # [n, 1, d]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h)  # each [n, H, 1, hd]
            self.k_cache[i][write_rows, :, write_at] = k[:, :, 0]
            self.v_cache[i][write_rows, :, write_at] = v[:, :, 0]
            if packed:
                keys, values = self.k_cache[i][: len(slots), :, :width], self.v_cache[i][: len(slots), :, :width]
            else:
                keys = self.k_cache[i].index_select(0, slot_index)[:, :, :width]
                values = self.v_cache[i].index_select(0, slot_index)[:, :, :width]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            h = self._mlp(layer, h, _merge_heads(attn))
        logits = self._logits(h[:, -1])
        if in_order:
            return logits
        inverse = [0] * len(order)
        for position, original in enumerate(order):
            inverse[original] = position
        return logits[inverse]

    def _mark_written(self, slots: list[int], positions: list[int]) -> None:
        for slot, position in zip(slots, positions, strict=True):
            self.written[slot] = max(self.written[slot], position + 1)

    def _clear_unwritten(self, slots: list[int], width: int) -> None:
        """Zero the cache positions below `width` that no row wrote: a masked attention weight is 0, but 0 times
        a NaN left in torch.empty memory is still NaN, which would poison the shorter rows of a ragged step."""
        end = min(width + 64, self.context_length)  # ahead of need, so this runs once per 64 steps, not every step
        starts: dict[int, list[int]] = {}
        for slot in slots:
            if self.written[slot] < width:
                starts.setdefault(self.written[slot], []).append(slot)
                self.written[slot] = end
        for start, group in starts.items():
            index = torch.tensor(group, device=self.wte.device)
            for cache in (*self.k_cache, *self.v_cache):
                cache[index, :, start:end] = 0

    def _qkv_rows(self, layer: BlockWeights, h: torch.Tensor) -> torch.Tensor:
        """The first layer norm and the qkv product of h [n, t, d]: [n * t, 3d], rows as they come."""
        n, t, d = h.shape
        return layer.qkv(F.layer_norm(h, (d,), *layer.ln1, self.eps).view(n * t, d))

    def _qkv(self, layer: BlockWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = h.shape
        qkv = self._qkv_rows(layer, h).view(n, t, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, H, t, hd]
        return q, k, v

    def _mlp(self, layer: BlockWeights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of a block after attention, attn [n, t, d] with the heads side by side."""
        n, t, d = h.shape
        h = h + layer.proj(attn.reshape(n * t, d)).view(n, t, d)
        m = F.layer_norm(h, (d,), *layer.ln2, self.eps).view(n * t, d)
        inner = layer.fc.tanh_gelu(m) if self.tanh_gelu else self.act(layer.fc(m))
        return h + layer.out(inner).view(n, t, d)

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        h_last = F.layer_norm(h_last, (h_last.shape[-1],), *self.ln_f, self.eps)
        return self.lm_head(h_last).float()

    def _release(self, row: int) -> None:
        slot = self.slot_of.pop(row)
        last = len(self.slot_of)
        if slot == last:
            return
        moved = next(r for r, s in self.slot_of.items() if s == last)
        length = self.lengths[moved]
        for cache in (*self.k_cache, *self.v_cache):
            cache[slot, :, :length] = cache[last, :, :length]
        self.slot_of[moved] = slot
        self.written[slot] = max(self.written[slot], length)

