"""The bundled model's recipe: pre-train a small GPT-2 from scratch on the Russian corpus, on a CPU.

nanoGPT-style: the corpus is tokenised once into flat uint16 arrays with `<|endoftext|>` between
documents; training samples random blocks, uses AdamW with warm-up and a cosine decay driven by a
wall-clock budget (so "train for an hour" means an hour on any machine), and bf16 autocast where the
CPU supports it. Checkpoints are written atomically and a killed run resumes from the latest one.
Loss, schedule, optimizer, checkpoints and loss plot are the fine-tuning's own (training/loss.py,
schedule.py, optimizers.py, checkpoints.py, report.py): one implementation of each for every trainer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rugpt.atomic import atomic_write_text
from rugpt.errors import UsageError
from rugpt.training.checkpoints import (
    TrainerState,
    latest_checkpoint,
    load_optimizer_and_state,
    load_weights,
    save_local_checkpoint,
)
from rugpt.training.corpus import Document, load_corpus
from rugpt.training.loss import loss_on_targets
from rugpt.training.optimizers import make_optimizer
from rugpt.training.report import plot_loss_curve
from rugpt.training.schedule import scheduled_lr
from rugpt.training.settings import Optimizer, Schedule

log = logging.getLogger(__name__)


@dataclass
class PretrainSettings:
    """Settings of the bundled-model recipe; every default lives here."""

    corpus: Path | None = field(default=None, metadata={
        "help": "the RusLit folder (github.com/d0rj/RusLit); default: the one `rugpt train-tokenizer` was given"})
    tokenizer: Path = field(default=Path("runs/bundled/tokenizer"), metadata={"help": "the tokenizer's folder"})
    out: Path = field(default=Path("runs/bundled"), metadata={"help": "run folder: token cache, checkpoint, settings"})
    fortunes: bool = field(default=True, metadata={"help": "add Debian's fortunes-ru (GPL-2; sex-themed files out)"})
    init_from: Path | None = field(default=None, metadata={
        "help": "start from this model folder's weights (e.g. the bundled model) instead of random ones; its shape "
                "replaces n_layer/n_embd/n_head"})
    vocab_size: int = field(default=8000, metadata={"help": "tokens in the tokenizer's vocabulary"})
    heldout_fraction: float = field(default=0.03, metadata={"help": "share of documents never trained on"})
    n_layer: int = field(default=6, metadata={"help": "transformer layers"})
    n_embd: int = field(default=256, metadata={"help": "width"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    block_size: int = field(default=512, metadata={"help": "context length in tokens"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step at full length"})
    short_until: float = field(default=0.6, metadata={"help": "train on half-length blocks (twice as many) until "
                                                              "this share of the budget: sequence-length warm-up"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (after warm-up)"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_steps: int = field(default=200, metadata={"help": "steps of linear learning-rate warm-up"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    minutes: float = field(default=95.0, metadata={"help": "wall-clock budget; the learning-rate schedule follows it"})
    max_steps: int = field(default=0, metadata={"help": "step budget instead of (or as well as) minutes; 0 = none"})
    eval_every: int = field(default=300, metadata={"help": "measure the held-out loss every N steps"})
    eval_blocks: int = field(default=64, metadata={"help": "held-out blocks per measurement"})
    seed: int = field(default=1234, metadata={"help": "random seed: initialisation and the blocks sampled"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (fast on CPUs with AVX-512 bf16)"})
    threads: int = field(default=0, metadata={"help": "torch threads; 0 = torch's default"})

    def __post_init__(self) -> None:
        self.tokenizer, self.out = Path(self.tokenizer), Path(self.out)
        self.corpus = Path(self.corpus) if self.corpus is not None else None
        self.init_from = Path(self.init_from) if self.init_from is not None else None
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.minutes <= 0 and self.max_steps <= 0:
            raise UsageError("give a training budget: minutes > 0 or max_steps > 0")
        if not 0 < self.heldout_fraction < 0.5:
            raise UsageError(f"heldout_fraction={self.heldout_fraction} must be in (0, 0.5)")


CORPUS_RECORD = "rugpt_corpus.json"  # beside the tokenizer: which corpus it was trained on


def corpus_folder(settings: PretrainSettings) -> Path:
    """The corpus to read: --corpus, else the one recorded by `rugpt train-tokenizer`; a UsageError naming what
    to give when there is neither or the folder is gone."""
    corpus = settings.corpus
    record = settings.tokenizer / CORPUS_RECORD
    if corpus is None and record.is_file():
        corpus = Path(json.loads(record.read_text())["corpus"])
    if corpus is None:
        raise UsageError("no corpus: give --corpus FOLDER, a copy of RusLit (git clone "
                         "https://github.com/d0rj/RusLit), or train the tokenizer with it first")
    if not corpus.is_dir():
        raise UsageError(f"corpus={str(corpus)!r} is not a folder; give --corpus with the RusLit folder "
                         f"(git clone https://github.com/d0rj/RusLit)")
    return corpus


def train_recipe_tokenizer(settings: PretrainSettings) -> tuple[int, float]:
    """Train the tokenizer on the training split; returns its size and held-out characters per token."""
    from rugpt.tokenizer import train_tokenizer

    corpus = corpus_folder(settings)
    train, heldout = load_corpus(corpus, settings.fortunes, settings.heldout_fraction)
    tokenizer = train_tokenizer((d.text for d in train), settings.vocab_size, settings.tokenizer)
    atomic_write_text(settings.tokenizer / CORPUS_RECORD, json.dumps({"corpus": str(corpus.resolve())}))
    text = "\n".join(d.text for d in heldout)
    return len(tokenizer), len(text) / max(1, len(tokenizer(text)["input_ids"]))


def encode_documents(tokenizer, docs: list[Document]) -> np.ndarray:
    """All documents as one uint16 token stream, each followed by `<|endoftext|>`."""
    eot = tokenizer.eos_token_id
    ids: list[int] = []
    batch = [d.text for d in docs]
    for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eot)
    if max(ids) >= 2**16:
        raise UsageError("vocabulary too large for the uint16 token cache (max 65536)")
    return np.asarray(ids, dtype=np.uint16)


def prepare_tokens(settings: PretrainSettings, tokenizer) -> dict[str, np.ndarray]:
    """Tokenised train and held-out streams, cached in the run folder; also records their character counts."""
    cache = settings.out / "tokens"
    names = ("train", "heldout")
    if all((cache / f"{n}.npy").exists() for n in names):
        return {n: np.load(cache / f"{n}.npy", mmap_mode="r") for n in names}
    train, heldout = load_corpus(corpus_folder(settings), settings.fortunes, settings.heldout_fraction)
    cache.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, docs in zip(names, (train, heldout), strict=True):
        tokens = encode_documents(tokenizer, docs)
        np.save(cache / f"{name}.npy", tokens)
        stats[name] = {"documents": len(docs), "characters": sum(len(d.text) for d in docs), "tokens": len(tokens)}
        stats[name]["sources"] = [d.source for d in docs] if name == "heldout" else None
    atomic_write_text(cache / "stats.json", json.dumps(stats, ensure_ascii=False, indent=1))
    return {n: np.load(cache / f"{n}.npy", mmap_mode="r") for n in names}


def sample_batch(tokens: np.ndarray, block: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of `block + 1` tokens: inputs and next-token targets."""
    starts = torch.randint(0, len(tokens) - block - 1, (batch,), generator=gen).tolist()
    rows = np.stack([tokens[s : s + block + 1].astype(np.int64) for s in starts])
    data = torch.from_numpy(rows)
    return data[:, :-1], data[:, 1:]


def heldout_blocks(tokens: np.ndarray, block: int, count: int) -> torch.Tensor:
    """`count` evenly spaced, fixed windows of the held-out stream, the same at every evaluation."""
    step = max(1, (len(tokens) - block - 1) // count)
    rows = [tokens[i * step : i * step + block + 1].astype(np.int64) for i in range(count)]
    return torch.from_numpy(np.stack([r for r in rows if len(r) == block + 1]))


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, bf16: bool, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the fixed held-out windows."""
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total += float(loss_on_targets(model, chunk[:, :-1], chunk[:, 1:]))
    model.train()
    return total / (len(blocks) * (blocks.shape[1] - 1))


def learning_rate(settings: PretrainSettings, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr` as progress goes 0 → 1."""
    return scheduled_lr(settings.lr, step, settings.warmup_steps, progress, Schedule.cosine, settings.min_lr)


def build_model(settings: PretrainSettings, vocab_size: int, eos_id: int):
    """A fresh GPT-2 of the configured shape (no dropout: one pass over the data does not overfit)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=settings.block_size,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def initial_model(settings: PretrainSettings, vocab_size: int, eos_id: int):
    """The model training starts from: `init_from`'s weights (continued pre-training), else a fresh one."""
    if settings.init_from is None:
        return build_model(settings, vocab_size, eos_id)
    from transformers import GPT2LMHeadModel

    if not (settings.init_from / "config.json").is_file():
        raise UsageError(f"init_from={str(settings.init_from)!r} is not a model folder (no config.json in it)")
    model = GPT2LMHeadModel.from_pretrained(settings.init_from, dtype=torch.float32)
    if model.config.vocab_size != vocab_size:
        raise UsageError(f"init_from={str(settings.init_from)!r} has {model.config.vocab_size} vocabulary rows; "
                         f"the tokenizer has {vocab_size}: give the tokenizer that model was trained with")
    if model.config.n_positions < settings.block_size:
        raise UsageError(f"block_size={settings.block_size} is longer than init_from's context "
                         f"({model.config.n_positions})")
    return model


def make_recipe_optimizer(model, settings: PretrainSettings) -> torch.optim.Optimizer:
    """AdamW (β2 0.95, as GPT-3) under the shared weight-decay rule (training/optimizers.py)."""
    return make_optimizer(model, Optimizer.adamw, settings.lr, settings.weight_decay, betas=(0.9, 0.95))


def load_state(out: Path, model, optimizer) -> TrainerState | None:
    """Restore the latest checkpoint of this run folder (our own files only), or None when there is none."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return None
    load_weights(checkpoint, model, lora=False)
    return load_optimizer_and_state(checkpoint, optimizer)


def pretrain(settings: PretrainSettings) -> dict:
    """Run (or resume) the recipe; returns the last evaluation. The model lands in the latest checkpoint's
    `model/` folder (`out/checkpoints/step-N/model`), its loss curve in `out/loss_curve.png`."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rugpt.training.memory import return_freed_memory
    from rugpt.training.model_prep import use_fused_gelu

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return_freed_memory()
    hf_logging.disable_progress_bar()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    tokens = prepare_tokens(settings, tokenizer)
    model = initial_model(settings, len(tokenizer), tokenizer.eos_token_id)
    use_fused_gelu(model)
    optimizer = make_recipe_optimizer(model, settings)
    state = load_state(settings.out, model, optimizer) or TrainerState()
    gen = torch.Generator().manual_seed(settings.seed + state.step)
    blocks = heldout_blocks(tokens["heldout"], settings.block_size, settings.eval_blocks)
    log.info("model: %.2fM parameters; train tokens: %d", model.num_parameters() / 1e6, len(tokens["train"]))
    atomic_write_text(settings.out / "settings.json", json.dumps(asdict(settings), default=str, indent=1))
    model.train()
    started = time.monotonic() - state.elapsed
    while True:
        elapsed = time.monotonic() - started
        progress = max(elapsed / (settings.minutes * 60) if settings.minutes > 0 else 0.0,
                       state.step / settings.max_steps if settings.max_steps > 0 else 0.0)
        if progress >= 1.0:
            break
        lr = learning_rate(settings, state.step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        short = progress < settings.short_until
        block = settings.block_size // 2 if short else settings.block_size
        batch = settings.batch_size * 2 if short else settings.batch_size
        x, y = sample_batch(tokens["train"], block, batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            loss = loss_on_targets(model, x, y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += y.numel()
        if state.step % 20 == 0:
            state.history.append({"step": state.step, "loss": round(loss.item(), 4), "lr": lr})
            log.info("step %d  loss %.3f  lr %.2e  %.0f tok/s  %.1f min", state.step, loss.item(), lr,
                     state.tokens_seen / max(time.monotonic() - started, 1e-9), elapsed / 60)
        if state.step % settings.eval_every == 0:
            _evaluate_and_save(settings, model, optimizer, state, blocks, time.monotonic() - started)
    if state.evals and state.evals[-1]["step"] == state.step:  # the budget ended on an evaluation
        return state.evals[-1]
    return _evaluate_and_save(settings, model, optimizer, state, blocks, time.monotonic() - started)


def _evaluate_and_save(settings, model, optimizer, state: TrainerState, blocks, elapsed: float) -> dict:
    loss = heldout_loss(model, blocks, settings.bf16)
    state.elapsed = elapsed
    entry = {"step": state.step, "minutes": round(elapsed / 60, 2), "eval_loss": round(loss, 4),
             "tokens_seen": state.tokens_seen}
    state.evals.append(entry)
    log.info("eval %s", entry)
    save_local_checkpoint(settings.out, model, optimizer, state, keep=1)
    plot_loss_curve(state, settings.out / "loss_curve.png")
    return entry
