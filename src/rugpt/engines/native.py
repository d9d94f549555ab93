"""rugpt's own decode step (native_step.c) for the fast engine, compiled on first use with the machine's C compiler.

Why compile here rather than ship a binary: `-march=native` gives the widest vectors this CPU has
(AVX-512, AVX2, NEON) from one portable source, and the build takes under a second. The library
lands in `<cache>/native/<key>/` (key: source, compiler, flags, CPU), written through a temp folder,
and is reused afterwards. Each process checks it against transformers on a tiny model before using it.

The same library holds the products that the fast engine's prefills call for 8- and 4-bit weights and
bf16 (rugpt_linear, blocked over tokens, the MLP's GELU fused in), their causal attention
(rugpt_attention), the q4 quantizer (q4.py) and a measured compute-peak loop for the benchmarks.

Without a C compiler with OpenMP (or with RUGPT_NATIVE=0) the fast engine steps with torch ops, and
the log says once why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rugpt.atomic import atomic_write_dir
from rugpt.cache import cache_dir
from rugpt.engines.linear import BlockWeights, PackedLinear, pack_linear, quantize_int8
from rugpt.engines.q4 import BLOCK as Q4_BLOCK

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native_step.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi"]
# native_step.c's weight types: int8 arrives in int8_tiled's tiles, q4 (uint8) in q4.tile_q4's
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}
_P = ctypes.POINTER(ctypes.c_float)
_INTS = ctypes.POINTER(ctypes.c_int)


class NativeUnavailable(RuntimeError):
    """The native step cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class Kernel:
    step: Callable  # rugpt_step: one decode step of up to max_rows rows
    linear: Callable  # rugpt_linear: one product, for 8- and 4-bit prefills
    # the weight formats it reads: int8 and q4 only where the CPU has VNNI; fp16 never (fbgemm's fp16 kernel
    # reads it faster than widening it here did: 8.8 vs 12-13 ms a step at batch 1)
    formats: tuple[str, ...]
    quantize_q4: Callable | None = None  # rugpt_quantize_q4: fp32 weights to q4 tiles (q4.kernel_quantize_q4)
    bf16_prefill: bool = False  # its bf16 products of many rows beat oneDNN's (AVX-512 BF16 and VNNI)
    attention: Callable | None = None  # rugpt_attention: a prefill's causal attention (AVX-512; heads of 16s)


class _Linear(ctypes.Structure):  # native_step.c's Linear
    _fields_ = [("w", ctypes.c_void_p), ("s", _P), ("z", _INTS), ("b", _P), ("type", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_w", _P), ("ln1_b", _P), ("qkv", _Linear), ("proj", _Linear), ("ln2_w", _P), ("ln2_b", _P),
                ("fc", _Linear), ("out", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("n_layer", "d", "n_head", "d_ff", "vocab", "ctx")] + [
        ("eps", ctypes.c_float),
        *((name, _P) for name in ("wte", "wpe", "lnf_w", "lnf_b")),
        ("lm", _Linear),
        ("layers", ctypes.POINTER(_Layer)),
        ("k_cache", ctypes.POINTER(_P)),
        ("v_cache", ctypes.POINTER(_P)),
        *((name, _P) for name in ("h", "a", "qkv", "att", "f", "scores", "xq", "xs", "xb")),
    ]


def linear_struct(linear: PackedLinear, bias: torch.Tensor | None = None) -> _Linear:
    """The C view of a packed linear layer, with its own fp32 bias or `bias` (the tensors must outlive it)."""
    return _Linear(linear.weight.data_ptr(), _ptr(linear.scale), _int_ptr(linear.row_sums),
                   _ptr(bias if bias is not None else linear.bias), WEIGHT_TYPES[linear.weight.dtype])


class NativeStep:
    """Decode steps of one GPT-2 (tanh GELU, CPU) over the fast engine's fp32 KV cache, up to its rows at a time.

    Each linear weight is [out, in] fp32 or bf16, or int8 in int8_tiled's tiles (per-row scales, multiplied by
    activations quantized per row), or 4-bit codes in q4.tile_q4's tiles; layers may mix them. Embeddings,
    layer norms, biases and the cache are fp32. Caches are [rows, heads, ctx, head_dim].
    """

    def __init__(self, kernel: Kernel, *, wte: torch.Tensor, wpe: torch.Tensor,
                 ln_f: tuple[torch.Tensor, torch.Tensor], lm_head: PackedLinear, layers: list[BlockWeights],
                 k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], n_head: int, eps: float):
        self._kernel = kernel.step
        self._keep: list[torch.Tensor] = []  # the structs hold raw pointers: keep what they point into alive
        norms = [t for layer in layers for t in (*layer.ln1, *layer.ln2)]
        for tensor in (wte, wpe, *ln_f, *norms, *k_cache, *v_cache):
            self._hold(tensor, torch.float32)
        self._layers = (_Layer * len(layers))(*(
            _Layer(_ptr(layer.ln1[0]), _ptr(layer.ln1[1]), self._linear(layer.qkv), self._linear(layer.proj),
                   _ptr(layer.ln2[0]), _ptr(layer.ln2[1]), self._linear(layer.fc), self._linear(layer.out))
            for layer in layers))
        vocab, d = wte.shape
        self.max_rows, _, ctx, _ = k_cache[0].shape
        d_ff = layers[0].fc.bias.shape[0]
        per_row = (("h", d), ("a", d), ("qkv", 3 * d), ("att", d), ("f", d_ff), ("scores", n_head * ctx))
        scratch = [torch.zeros(self.max_rows, size) for _, size in per_row]
        widest = -(-max(d, d_ff) // Q4_BLOCK) * Q4_BLOCK  # q4 inputs are padded to whole blocks
        # the inputs quantized to bytes, or rounded to bf16 (two bytes each, rows in whole groups of 8) for a bf16
        # product of many rows
        scratch += [torch.zeros(-(-self.max_rows // 8) * 8, 2 * widest, dtype=torch.uint8), torch.zeros(self.max_rows),
                    torch.zeros(self.max_rows, widest // Q4_BLOCK)]
        self._keep += scratch
        self._k, self._v = _pointers(k_cache), _pointers(v_cache)
        self._model = _Model(len(layers), d, n_head, d_ff, vocab, ctx, eps, *(_ptr(t) for t in (wte, wpe, *ln_f)),
                             self._linear(lm_head), self._layers, self._k, self._v, *(_ptr(t) for t in scratch))
        self.vocab = vocab

    def _linear(self, linear: PackedLinear) -> _Linear:
        if linear.weight is None or linear.weight.dtype not in WEIGHT_TYPES:
            raise ValueError(f"the native step reads weights of {list(WEIGHT_TYPES)} only")
        if linear.weight.dtype == torch.int8 and linear.row_sums is None:
            raise ValueError("int8 weights reach the native step packed by int8_tiled (its tiles and row sums)")
        bias = linear.bias.float().contiguous() if linear.bias is not None else None  # bf16 weights: a bf16 bias
        self._hold(linear.weight, linear.weight.dtype)
        for tensor, dtype in ((linear.scale, torch.float32), (linear.row_sums, torch.int32), (bias, torch.float32)):
            if tensor is not None:
                self._hold(tensor, dtype)
        return linear_struct(linear, bias)

    def _hold(self, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != dtype:
            raise ValueError("the native step needs contiguous CPU tensors, fp32 apart from the linear weights")
        self._keep.append(tensor)

    def __call__(self, slots: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        """Logits [n, vocab] for tokens[r] at positions[r] of the row in cache slot slots[r]; writes their K and V."""
        n = len(slots)
        if not 0 < n <= self.max_rows:
            raise ValueError(f"the native step takes 1 to {self.max_rows} rows, not {n}")
        logits = torch.empty(n, self.vocab)
        ints = ctypes.c_int * n
        self._kernel(ctypes.byref(self._model), n, ints(*slots), ints(*positions), ints(*tokens), _ptr(logits),
                     torch.get_num_threads())
        return logits


TILE_ROWS, TILE_COLUMNS = 8, 64  # native_step.c's int8 tiles


def int8_tiled(kernel: Kernel, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """`weight` ([out, in], `in` a multiple of 64) quantized to int8 per row and laid out in the kernel's tiles;
    its products, prefills included, computed by the kernel: aten's weight-only int8 matmul takes seconds for
    a 64-token prefill, and fbgemm would need a second copy of the weights."""
    q, scale = quantize_int8(weight.detach())
    bias = bias.detach().float().contiguous() if bias is not None else None
    out, n_in = q.shape
    row_sums = q.sum(1, dtype=torch.int32)  # the kernel's inputs are stored +128: that adds 128 * sum per row
    padded = torch.cat([q, q.new_zeros(-out % TILE_ROWS, n_in)])
    tiles = padded.view(-1, TILE_ROWS, n_in // TILE_COLUMNS, TILE_COLUMNS).transpose(1, 2).contiguous()

    packed = PackedLinear(lambda x: x, tiles.numel() + scale.numel() * 4, tiles, scale, bias, row_sums)
    use_kernel(kernel, packed, n_in, out)
    return packed


_STORE, _GELU = 0, 2  # native_step.c's product modes: y = Wx + b, y = gelu(Wx + b)


def use_kernel(kernel: Kernel, linear: PackedLinear, n_in: int, out: int) -> None:
    """Give `linear` the kernel's rugpt_linear over its stored (tiled) weights as its forward, and as its fused
    product-then-tanh-GELU (a prefill's MLP input layer without a pass over the 4d-wide activations)."""
    bias = linear.bias.float().contiguous() if linear.bias is not None else None  # bf16 weights: a bf16 bias
    struct = linear_struct(linear, bias)

    def product(x: torch.Tensor, mode: int) -> torch.Tensor:
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], out)
        if kernel.linear(_ptr(x), ctypes.byref(struct), _ptr(y), x.shape[0], n_in, out, mode,
                         torch.get_num_threads()):
            raise MemoryError(f"no memory for the scratch of a {x.shape[0]}-row product")
        return y

    product.keep = bias  # the struct points into it
    linear.forward = lambda x: product(x, _STORE)
    linear.forward_gelu = lambda x: product(x, _GELU)


def prefill_attention(kernel: Kernel, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      start: int) -> torch.Tensor:
    """Causal attention [T, d] of the T queries in qkv ([T, 3d], fp32, contiguous) at positions start .. start + T - 1
    over one row's caches ([heads, ctx, head_dim], its keys and values for positions 0 .. start + T - 1 written);
    heads side by side in each row, as the output projection reads them."""
    tokens, width = qkv.shape
    heads, ctx, _ = k_cache.shape
    out = torch.empty(tokens, width // 3)
    code = kernel.attention(_ptr(qkv), tokens, width // 3, heads, _ptr(k_cache), _ptr(v_cache), ctx, start, _ptr(out),
                            torch.get_num_threads())
    if code == -1:
        raise MemoryError(f"no memory for the attention scratch of a {tokens}-token prefill")
    if code:
        raise ValueError(f"the compiled attention does not take heads {width // 3 // heads} wide or {start + tokens} "
                         f"positions in a context of {ctx}")
    return out


def untile_int8(tiles: torch.Tensor, out: int) -> torch.Tensor:
    """The [out, in] int8 weight of `tiles` (int8_tiled's layout)."""
    blocks, steps, rows, columns = tiles.shape
    return tiles.transpose(1, 2).reshape(blocks * rows, steps * columns)[:out]


def _ptr(tensor: torch.Tensor | None):
    return ctypes.cast(tensor.data_ptr(), _P) if tensor is not None else _P()


def _int_ptr(tensor: torch.Tensor | None):
    return ctypes.cast(tensor.data_ptr(), _INTS) if tensor is not None else _INTS()


def _pointers(tensors) -> ctypes.Array:
    items = [_ptr(t) for t in tensors]
    return (_P * len(items))(*items)


@functools.cache
def step_kernel() -> Kernel | None:
    """The compiled `rugpt_step`, or None (logged once) when it cannot be built or fails its check."""
    try:
        kernel = _load()
        _check(kernel)
        return kernel
    except (NativeUnavailable, OSError) as error:
        log.warning("native decode step not used (%s); the fast engine steps with torch ops", error)
        return None


def _load() -> Kernel:
    if os.environ.get("RUGPT_NATIVE", "1") == "0":
        raise NativeUnavailable("RUGPT_NATIVE=0")
    library = ctypes.CDLL(str(_built()))
    step = library.rugpt_step
    step.argtypes = [ctypes.c_void_p, ctypes.c_int, _INTS, _INTS, _INTS, _P, ctypes.c_int]
    step.restype = None
    linear = library.rugpt_linear
    linear.argtypes = [_P, ctypes.c_void_p, _P] + [ctypes.c_int] * 5
    linear.restype = ctypes.c_int
    if library.rugpt_q4_block() != Q4_BLOCK:
        raise NativeUnavailable(f"the built step reads q4 blocks of {library.rugpt_q4_block()}, not {Q4_BLOCK}")
    quantize = library.rugpt_quantize_q4
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_int]
    quantize.restype = None
    formats = ("fp32", "bf16", "int8", "q4") if library.rugpt_has_vnni() else ("fp32", "bf16")
    attention = None
    if library.rugpt_has_attention():
        attention = library.rugpt_attention
        attention.argtypes = [_P] + [ctypes.c_int] * 3 + [_P, _P] + [ctypes.c_int] * 2 + [_P, ctypes.c_int]
        attention.restype = ctypes.c_int
    return Kernel(step, linear, formats, quantize, bool(library.rugpt_bf16_panels()), attention)


def _check(kernel: Kernel) -> None:
    """A miscompiled or misloaded kernel must never give wrong answers: compare with transformers on a tiny GPT-2,
    two rows of different lengths stepped alone and together."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=61, n_positions=16, n_embd=40, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng():  # the caller's random state (a user's seed) stays as it was
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    tokens = [[3, 17, 42, 5], [8, 1, 60, 33, 2, 9]]
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    k_cache = [torch.zeros(2, heads, config.n_positions, head_dim) for _ in range(config.n_layer)]
    v_cache = [torch.zeros_like(k) for k in k_cache]
    step = NativeStep(kernel, **_fp32_weights(model), k_cache=k_cache, v_cache=v_cache, n_head=heads,
                      eps=config.layer_norm_epsilon)
    with torch.inference_mode():
        expected = [model(torch.tensor([row])).logits[0] for row in tokens]
        got = [[], [step([1], [0], [tokens[1][0]])[0], step([1], [1], [tokens[1][1]])[0]]]
        for position in range(len(tokens[0])):
            both = step([0, 1], [position, position + 2], [tokens[0][position], tokens[1][position + 2]])
            got[0].append(both[0])
            got[1].append(both[1])
    error = max((torch.stack(g) - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    if not error < 1e-4:
        raise NativeUnavailable(f"the built step disagrees with transformers (max abs error {error:g})")
    _check_q4(kernel)
    _check_attention(kernel)


def _check_attention(kernel: Kernel) -> None:
    """The compiled prefill attention agrees with torch's, from position 0 and after cached positions."""
    if kernel.attention is None:
        return
    heads, head_dim, ctx = 2, 16, 24
    with torch.random.fork_rng():
        torch.manual_seed(0)
        keys, values = torch.randn(heads, ctx, head_dim), torch.randn(heads, ctx, head_dim)
        queries = torch.randn(heads, ctx, head_dim)
    for start, tokens in ((0, 13), (7, 9)):
        qkv = torch.cat([t[:, start:start + tokens].transpose(0, 1).reshape(tokens, -1)
                         for t in (queries, keys, values)], dim=1).contiguous()
        end = start + tokens
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        expected = F.scaled_dot_product_attention(queries[:, start:end], keys[:, :end], values[:, :end], attn_mask=mask)
        got = prefill_attention(kernel, qkv, keys, values, start)
        error = (got - expected.transpose(0, 1).reshape(tokens, -1)).abs().max().item()
        if not error < 1e-5:
            raise NativeUnavailable(f"the built prefill attention disagrees with torch's (max abs error {error:g})")


def _check_q4(kernel: Kernel) -> None:
    """The compiled quantizer writes q4.py's bytes, and its products match q4.reference_product."""
    from rugpt.engines import q4

    with torch.random.fork_rng():
        torch.manual_seed(0)
        weight, bias, x = torch.randn(37, 100), torch.randn(37), torch.randn(5, 100)
    if not torch.equal(q4.kernel_quantize_q4(kernel, weight), q4.tile_q4(*q4.quantize_q4(weight, pad_to=128))):
        raise NativeUnavailable("the built q4 quantizer disagrees with rugpt.engines.q4")
    if "q4" not in kernel.formats:
        return
    packed = q4.pack_q4(weight, bias, kernel)
    expected = q4.reference_product(x, q4.dequantize_q4(*q4.untile_q4(packed.weight, 37))[:, :100], bias)
    error = (packed(x) - expected).abs().max().item()
    if not error < 1e-4 * expected.abs().max().item():
        raise NativeUnavailable(f"the built q4 products disagree with their reference (max abs error {error:g})")


def _fp32_weights(model) -> dict:
    transformer = model.transformer

    def linear(conv) -> PackedLinear:
        return pack_linear(conv.weight.detach().t().contiguous(), conv.bias, "fp32")

    def norm(ln) -> tuple[torch.Tensor, torch.Tensor]:
        return ln.weight.detach(), ln.bias.detach()

    layers = [BlockWeights(ln1=norm(b.ln_1), qkv=linear(b.attn.c_attn), proj=linear(b.attn.c_proj),
                              ln2=norm(b.ln_2), fc=linear(b.mlp.c_fc), out=linear(b.mlp.c_proj))
              for b in transformer.h]
    wte = transformer.wte.weight.detach()
    return dict(wte=wte, wpe=transformer.wpe.weight.detach(), ln_f=norm(transformer.ln_f),
                lm_head=pack_linear(wte, None, "fp32"), layers=layers)


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise NativeUnavailable("no C compiler found (install gcc, or set CC)")
    return compiler


def _key(compiler: str) -> str:
    """Changes with the source, the compiler, the flags and the CPU, so a cache shared between machines stays right."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(), _cpu().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _built() -> Path:
    compiler = _compiler()
    folder = cache_dir() / "native" / _key(compiler)
    library = folder / "librugpt_step.so"
    if library.exists():
        return library
    with atomic_write_dir(folder) as tmp:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp / library.name), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise NativeUnavailable(f"{compiler} failed: {last}")
    log.info("built the native decode step into %s", folder)
    return library
