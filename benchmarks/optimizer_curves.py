"""What the memory-light optimizers do to the loss curve: the bundled model fine-tuned on the same jokes with the
same seed, steps and learning-rate schedule, once per optimizer (AdamW, Adafactor, and bitsandbytes' 8-bit AdamW
where it runs: CUDA). The planner picks the lighter ones only when AdamW does not fit; this is their price.

Data: `../shared/data/jokes/clean_comedy_gold_ru.csv` (1000 Russian one-liners), 10% held out.

    python benchmarks/optimizer_curves.py            # 150 steps each, writes results/optimizer_curves.json + .png
    python benchmarks/optimizer_curves.py --quick    # 6 steps each: checks the script (writes to /tmp)
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
JOKES = ROOT.parents[1] / "shared" / "data" / "jokes" / "clean_comedy_gold_ru.csv"
RUN = dict(block_size=128, batch_size=8, lr=5e-4, warmup_steps=10, eval_every=25, seed=0, eval_fraction=0.1)


def jokes_txt(source: Path, target: Path) -> Path:
    with source.open(encoding="utf-8") as f:
        texts = [row["text"].strip() for row in csv.DictReader(f) if row["text"].strip()]
    target.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n", encoding="utf-8")
    return target


def run(optimizer: str, data: Path, steps: int, work: Path) -> dict:
    from rugpt.training.finetune import finetune

    started = time.perf_counter()
    out = work / optimizer
    result = finetune(data, out, None, optimizer=optimizer, max_steps=steps,
                      **(RUN | {"eval_every": max(1, min(RUN["eval_every"], steps // 2))}))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"optimizer": optimizer, "seconds": round(time.perf_counter() - started, 1),
            "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
            "train_loss_last": result.train_loss, "train": [h["loss"] for h in metrics["history"]],
            "evals": metrics["evals"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, row in enumerate(rows):
        color = f"C{i}"
        ax.plot(range(1, len(row["train"]) + 1), row["train"], color=color, alpha=0.35, linewidth=1)
        ax.plot([0] + [e["step"] for e in row["evals"]], [row["eval_loss_before"]] +
                [e["eval_loss"] for e in row["evals"]], "o-", color=color, label=f"{row['optimizer']} (held-out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 steps each: check that the script works")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--data", type=Path, default=JOKES, help="the jokes CSV (a 'text' column)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    from rugpt.training.optimizers import unavailable
    from rugpt.training.settings import Optimizer

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kinds = [k.value for k in (Optimizer.adamw, Optimizer.adafactor, Optimizer.adamw8bit) if not unavailable(k, device)]
    steps = 6 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = jokes_txt(args.data, Path(tmp) / "jokes.txt")
        rows = [run(kind, data, steps, Path(tmp)) for kind in kinds]
    out = Path(tempfile.gettempdir()) if args.quick else ROOT / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": "bundled", "device": device, "steps": steps, "run": RUN, "results": rows,
              "skipped": {k.value: unavailable(k, device) for k in Optimizer if k != Optimizer.auto
                          and unavailable(k, device)}}
    (out / "optimizer_curves.json").write_text(json.dumps(report, indent=1))
    plot(rows, out / "optimizer_curves.png")
    for row in rows:
        print(f"{row['optimizer']:10s} held-out {row['eval_loss_before']:.4f} → {row['eval_loss_after']:.4f}, "
              f"last train loss {row['train_loss_last']:.4f}, {row['seconds']} s")
    print(f"wrote {out / 'optimizer_curves.json'}")


if __name__ == "__main__":
    main()
