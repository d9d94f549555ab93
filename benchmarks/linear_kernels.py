"""Time torch's CPU kernels for one decode-step linear layer (batch 1 and 8) in each weight format.

Which torch path, if any, reads 8-bit or 16-bit weights fast enough at batch 1 to beat fp32? A decode
step is bound by reading weights, so an ideal 8-bit kernel takes a quarter of the fp32 time. Shapes
are ruGPT-3 small's: 768→2304 (qkv), 768→3072 (mlp up), 3072→768 (mlp down), 768→50264 (logits).

    python benchmarks/linear_kernels.py      # prints a table, writes benchmarks/results/linear_kernels.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "results" / "linear_kernels.json"
SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 50264)]


def best_ms(fn: Callable[[], torch.Tensor], repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def kernels(n_in: int, n_out: int, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each format's y = x @ W.T for x [batch, n_in], W [n_out, n_in], as the fast engine would call it."""
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in) * 0.02
    bias = torch.zeros(n_out)
    x = torch.randn(batch, n_in)
    w_t = w.t().contiguous()  # GPT-2's Conv1D layout [in, out]
    w16 = w.to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    qw = torch.quantize_per_channel(w, scale, torch.zeros(n_out, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, bias)  # fbgemm's prepacked int8 weight
    packed16 = torch.ops.quantized.linear_prepack_fp16(w, bias)
    return {
        "fp32 addmm [in,out]": lambda: torch.addmm(bias, x, w_t),
        "fp32 F.linear": lambda: F.linear(x, w, bias),
        "bf16 F.linear": lambda: F.linear(x16, w16),
        "int8 _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "int8 fbgemm linear_dynamic": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
        "fp16 fbgemm linear_dynamic_fp16": lambda: torch.ops.quantized.linear_dynamic_fp16(x, packed16),
    }


def main() -> None:
    torch.set_num_threads(2)
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
    rows = []
    for batch in (1, 8):
        for n_in, n_out in SHAPES:
            for name, fn in kernels(n_in, n_out, batch).items():
                try:
                    ms = best_ms(fn)
                except (RuntimeError, NotImplementedError) as exc:
                    rows.append({"batch": batch, "shape": [n_in, n_out], "kernel": name, "error": str(exc)[:120]})
                    continue
                gb_s = n_in * n_out * {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[name.split()[0]] / ms / 1e6
                rows.append({"batch": batch, "shape": [n_in, n_out], "kernel": name, "ms": round(ms, 4),
                             "weight_gb_s": round(gb_s, 1)})
                print(f"batch {batch} {n_in:5d}x{n_out:<5d} {name:34s} {ms:8.3f} ms  {gb_s:6.1f} GB/s of weights")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"torch": torch.__version__, "threads": 2, "results": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
