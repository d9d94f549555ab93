"""Losses and held-out metrics for prompt tuning: target-token cross-entropy (text2text) and cross-entropy
over label words (classification)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rugpt.prompts.preprocessing import IGNORE_INDEX


def token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of every labelled token, [rows, T] (0 where the label is -100)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [rows, T, vocab]
    # Position t predicts token t + 1: shift the labels, not the logits, so the logits stay contiguous
    # (cross-entropy over a strided vocabulary dimension is about 3x slower on CPU).
    labels = F.pad(batch["labels"].to(device)[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(labels.shape)


def text2text_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of target-token NLL, number of target tokens) for a batch."""
    nll = token_nll(model, batch)
    return nll.sum(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def label_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-likelihood of each label word after each row, [rows, n_labels]."""
    n_rows = len(batch["label"])
    return -token_nll(model, batch).sum(-1).reshape(n_rows, -1)


def classification_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum over rows of cross-entropy over the label words, number of rows)."""
    scores = label_scores(model, batch)
    return F.cross_entropy(scores, batch["label"].to(scores.device), reduction="sum"), len(batch["label"])


@dataclass
class EvalMetrics:
    """Held-out metrics: mean loss per target token (text2text) or per row (classification)."""

    loss: float
    count: int
    accuracy: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def as_dict(self) -> dict[str, float | int | None]:
        return {"loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy, "count": self.count}


@torch.inference_mode()
def evaluate(model, batches: Iterable[dict[str, torch.Tensor]], classification: bool = False) -> EvalMetrics:
    """Mean held-out loss over all batches (token-weighted for text2text) and accuracy for classification."""
    total, count, correct = 0.0, 0, 0
    for batch in batches:
        if classification:
            scores = label_scores(model, batch)
            gold = batch["label"].to(scores.device)
            loss, n = F.cross_entropy(scores, gold, reduction="sum"), len(gold)
            correct += int((scores.argmax(-1) == gold).sum())
        else:
            loss, n = text2text_loss(model, batch)
        total, count = total + float(loss), count + n
    if count == 0:
        return EvalMetrics(float("nan"), 0)
    return EvalMetrics(total / count, count, correct / count if classification else None)
