"""Losses and held-out metrics for prompt tuning: target-token cross-entropy (text2text) and cross-entropy
over label words (classification)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rugpt.training.loss import count_targets, next_token_loss
from rugpt.training.report import perplexity


def token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of every labelled token, [rows, T]: position t scores labels[t + 1] (0 where that
    label is IGNORE_INDEX). rugpt's one next-token loss (rugpt.training.loss), so the logits never exist whole."""
    device = next(model.parameters()).device
    return next_token_loss(model, batch["input_ids"].to(device), batch["labels"].to(device),
                           batch["attention_mask"].to(device), reduction="none")


def text2text_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of target-token NLL, number of target tokens) for a batch."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    loss = next_token_loss(model, batch["input_ids"].to(device), labels, batch["attention_mask"].to(device))
    return loss, int(count_targets(labels))


def label_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-likelihood of each label word after each row, [rows, n_labels]."""
    n_rows = len(batch["label"])
    return -token_nll(model, batch).sum(-1).reshape(n_rows, -1)


def classification_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum over rows of cross-entropy over the label words, number of rows)."""
    loss, _ = _classification(model, batch)
    return loss, len(batch["label"])


def _classification(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the label words, rows whose likeliest label word is the gold one)."""
    scores = label_scores(model, batch)
    gold = batch["label"].to(scores.device)
    return F.cross_entropy(scores, gold, reduction="sum"), int((scores.argmax(-1) == gold).sum())


@dataclass
class EvalMetrics:
    """Held-out metrics: mean loss per target token (text2text) or per row (classification)."""

    loss: float
    count: int
    accuracy: float | None = None

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def as_dict(self) -> dict[str, float | int | None]:
        return {"loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy, "count": self.count}


@torch.inference_mode()
def evaluate(model, batches: Iterable[dict[str, torch.Tensor]], classification: bool = False) -> EvalMetrics:
    """Mean held-out loss over all batches (token-weighted for text2text) and accuracy for classification."""
    total, count, correct = 0.0, 0, 0
    for batch in batches:
        if classification:
            loss, right = _classification(model, batch)
            n, correct = len(batch["label"]), correct + right
        else:
            loss, n = text2text_loss(model, batch)
        total, count = total + float(loss), count + n
    if count == 0:
        return EvalMetrics(float("nan"), 0)
    return EvalMetrics(total / count, count, correct / count if classification else None)
