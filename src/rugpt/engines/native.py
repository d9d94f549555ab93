"""rugpt's own batch-1 fp32 decode step (native_step.c), compiled on first use with the machine's C compiler.

Why compile here rather than ship a binary: `-march=native` gives the widest vectors this CPU has
(AVX-512, AVX2, NEON) from one portable source, and the build takes under a second. The library
lands in `<cache>/native/<key>/` (key: source, compiler, flags, CPU), written through a temp folder,
and is reused afterwards. Each process checks it against torch on a tiny model before using it.

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
from pathlib import Path

import torch

from rugpt.atomic import atomic_write_dir
from rugpt.cache import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native_step.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
PER_LAYER = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b", "ln2_w", "ln2_b", "fc_w", "fc_b",
             "out_w", "out_b")  # the order native_step.c indexes them in
_P = ctypes.POINTER(ctypes.c_float)


class NativeUnavailable(RuntimeError):
    """The native step cannot be built or loaded here; the message says why."""


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("n_layer", "d", "n_head", "d_ff", "vocab", "ctx")] + [
        ("eps", ctypes.c_float),
        *((name, _P) for name in ("wte", "wpe", "lnf_w", "lnf_b")),
        ("layer", ctypes.POINTER(_P)),
        ("k_cache", ctypes.POINTER(_P)),
        ("v_cache", ctypes.POINTER(_P)),
        *((name, _P) for name in ("h", "a", "qkv", "att", "f", "scores")),
    ]


class NativeStep:
    """Decode steps of one GPT-2 (tanh GELU, fp32, CPU) over the fast engine's KV cache, up to `max_rows` rows.

    `layers` holds, per layer, the tensors named in PER_LAYER: weights [out, in] contiguous (the fast
    engine's fp32 layout), biases and layer-norm parameters. Caches are [rows, heads, ctx, head_dim].
    """

    def __init__(self, kernel, *, wte: torch.Tensor, wpe: torch.Tensor, ln_f: tuple[torch.Tensor, torch.Tensor],
                 layers: list[dict[str, torch.Tensor]], k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                 n_head: int, eps: float):
        self._kernel = kernel
        tensors = [wte, wpe, *ln_f, *(layer[name] for layer in layers for name in PER_LAYER), *k_cache, *v_cache]
        for tensor in tensors:
            if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError("the native step needs contiguous fp32 CPU tensors")
        vocab, d = wte.shape
        d_ff = layers[0]["fc_w"].shape[0]
        self.max_rows, _, ctx, _ = k_cache[0].shape
        per_row = (("h", d), ("a", d), ("qkv", 3 * d), ("att", d), ("f", d_ff), ("scores", n_head * ctx))
        self._scratch = {name: torch.zeros(self.max_rows, size) for name, size in per_row}
        self._keep = tensors  # the struct holds raw pointers: keep what they point into alive
        self._layer = _pointers(layer[name] for layer in layers for name in PER_LAYER)
        self._k, self._v = _pointers(k_cache), _pointers(v_cache)
        self._model = _Model(len(layers), d, n_head, d_ff, vocab, ctx, eps, *(_ptr(t) for t in (wte, wpe, *ln_f)),
                             self._layer, self._k, self._v, *(_ptr(t) for t in self._scratch.values()))
        self.vocab = vocab

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


def _ptr(tensor: torch.Tensor):
    return ctypes.cast(tensor.data_ptr(), _P)


def _pointers(tensors) -> ctypes.Array:
    items = [_ptr(t) for t in tensors]
    return (_P * len(items))(*items)


@functools.cache
def step_kernel():
    """The compiled `rugpt_step`, or None (logged once) when it cannot be built or fails its check."""
    try:
        kernel = _load()
        _check(kernel)
        return kernel
    except (NativeUnavailable, OSError) as error:
        log.warning("native decode step not used (%s); the fast engine steps with torch ops", error)
        return None


def _load():
    if os.environ.get("RUGPT_NATIVE", "1") == "0":
        raise NativeUnavailable("RUGPT_NATIVE=0")
    kernel = ctypes.CDLL(str(_built())).rugpt_step
    ints = ctypes.POINTER(ctypes.c_int)
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_int, ints, ints, ints, _P, ctypes.c_int]
    kernel.restype = None
    return kernel


def _check(kernel) -> None:
    """A miscompiled or misloaded kernel must never give wrong answers: compare with transformers on a tiny GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=61, n_positions=16, n_embd=40, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng():  # the caller's random state (a user's seed) stays as it was
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    tokens = [[3, 17, 42, 5], [8, 1, 60, 33, 2, 9]]  # two rows of different lengths, stepped together
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    k_cache = [torch.zeros(2, heads, config.n_positions, head_dim) for _ in range(config.n_layer)]
    v_cache = [torch.zeros_like(k) for k in k_cache]
    step = NativeStep(kernel, **gpt2_tensors(model), k_cache=k_cache, v_cache=v_cache, n_head=heads,
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


def gpt2_tensors(model) -> dict:
    """wte, wpe, ln_f and per-layer tensors of a transformers GPT-2, weights as contiguous [out, in]
    (the fast engine re-lays its fp32 weights out that way in place, so there this copies nothing)."""
    transformer = model.transformer

    def out_in(conv) -> torch.Tensor:
        return conv.weight.detach().t().contiguous()

    layers = [
        dict(ln1_w=b.ln_1.weight, ln1_b=b.ln_1.bias, qkv_w=out_in(b.attn.c_attn), qkv_b=b.attn.c_attn.bias,
             proj_w=out_in(b.attn.c_proj), proj_b=b.attn.c_proj.bias, ln2_w=b.ln_2.weight, ln2_b=b.ln_2.bias,
             fc_w=out_in(b.mlp.c_fc), fc_b=b.mlp.c_fc.bias, out_w=out_in(b.mlp.c_proj), out_b=b.mlp.c_proj.bias)
        for b in transformer.h
    ]
    return dict(wte=transformer.wte.weight.detach(), wpe=transformer.wpe.weight.detach(),
                ln_f=(transformer.ln_f.weight.detach(), transformer.ln_f.bias.detach()),
                layers=[{name: t.detach() for name, t in layer.items()} for layer in layers])


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
