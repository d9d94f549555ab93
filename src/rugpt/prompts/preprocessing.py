"""Turn data rows into token ids and loss labels for prompt tuning (ruPrompts' Text2TextPreprocessor and more).

The formatted prompt and the target are tokenized separately and joined, so the label mask is exact
(loss on target tokens only) and training sees the same tokens as generation, which continues the
formatted prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rugpt.errors import UsageError
from rugpt.prompts.format import MissingFieldError, PromptFormat

IGNORE_INDEX = -100  # label value that cross-entropy skips (PyTorch's and transformers' convention)


@dataclass
class Text2TextPreprocessor:
    """Format a row, append its target and end-of-text; labels are -100 except on the target tokens.

    With `max_tokens` and `truncation_field`, that field is cut (at its end, on a token boundary) so the
    whole sequence fits; without a truncation field, a target too long for `max_tokens` is cut instead.
    """

    prompt_format: PromptFormat
    tokenizer: Any
    target_field: str
    max_tokens: int | None = None
    truncation_field: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self.prompt_format, self.target_field, self.truncation_field, self.max_tokens)

    def __call__(self, items: Mapping[str, Any] | list[Mapping[str, Any]]):
        return [self.process(item) for item in items] if isinstance(items, list) else self.process(items)

    def process(self, item: Mapping[str, Any]) -> dict[str, list[int]]:
        target = _field_text(item, self.target_field, "target")
        target_ids = _ids(self.tokenizer, target) + [self.tokenizer.eos_token_id]
        prompt_ids = _prompt_ids(self, item, reserve=len(target_ids))
        if self.max_tokens is not None:
            target_ids = target_ids[: self.max_tokens - len(prompt_ids)]
        ids = prompt_ids + target_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}

    def collate_fn(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return lambda rows: pad_right(rows, pad)


@dataclass
class ClassificationPreprocessor:
    """Format a row once per label word (e.g. «Да», «Нет»); the loss is cross-entropy over the label words'
    log-likelihoods as continuations of the formatted row."""

    prompt_format: PromptFormat
    tokenizer: Any
    label_field: str
    labels: tuple[str, ...] = field(default=())
    max_tokens: int | None = None
    truncation_field: str | None = None

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise UsageError(f"labels={list(self.labels)} must name at least two different label words, "
                             f"e.g. ['Да', 'Нет']")
        _check_fields(self.prompt_format, self.label_field, self.truncation_field, self.max_tokens)
        self.label_ids = [_ids(self.tokenizer, word) for word in self.labels]
        if not all(self.label_ids):
            raise UsageError(f"a label word in {list(self.labels)} makes no tokens")

    def __call__(self, items: Mapping[str, Any] | list[Mapping[str, Any]]):
        return [self.process(item) for item in items] if isinstance(items, list) else self.process(items)

    def label_index(self, item: Mapping[str, Any]) -> int:
        value = _field_text(item, self.label_field, "label")
        if value not in self.labels:
            raise UsageError(f"label {value!r} is not one of the label words {list(self.labels)}")
        return self.labels.index(value)

    def process(self, item: Mapping[str, Any]) -> dict[str, Any]:
        gold = self.label_index(item)
        prompt_ids = _prompt_ids(self, item, reserve=max(len(ids) for ids in self.label_ids))
        choices = [{"input_ids": prompt_ids + ids, "attention_mask": [1] * (len(prompt_ids) + len(ids)),
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + ids} for ids in self.label_ids]
        return {"choices": choices, "label": gold}

    def collate_fn(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = pad_right([choice for row in rows for choice in row["choices"]], pad)  # [B * n_labels, T]
            batch["label"] = torch.tensor([row["label"] for row in rows])
            return batch

        return collate


def pad_right(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows of input_ids / attention_mask / labels, padding on the right (pad, 0, -100)."""
    width = max(len(row["input_ids"]) for row in rows)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])
            for key, value in fill.items()}


def _prompt_ids(pre: Text2TextPreprocessor | ClassificationPreprocessor, item: Mapping[str, Any],
                reserve: int) -> list[int]:
    """Token ids of the formatted row, with the truncation field cut so `reserve` more tokens fit."""
    token = pre.prompt_format.prompt_token
    if pre.prompt_format.has_slots and pre.tokenizer.convert_tokens_to_ids(token) in (None, pre.tokenizer.unk_token_id):
        raise UsageError(f"the tokenizer does not know the prompt token {token!r}: call prompt.patch(model, "
                         f"tokenizer) before preprocessing")
    if pre.max_tokens is not None and pre.truncation_field is not None:
        item = pre.prompt_format.truncate(item, pre.tokenizer, pre.max_tokens, pre.truncation_field, reserve)
    ids = _ids(pre.tokenizer, pre.prompt_format(item))
    if pre.max_tokens is not None and len(ids) >= pre.max_tokens:
        hint = "set truncation_field to a long field" if pre.truncation_field is None else "raise max_tokens"
        raise UsageError(f"the formatted row has {len(ids)} tokens, leaving no room in max_tokens={pre.max_tokens} "
                         f"for the answer: {hint}")
    return ids


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _field_text(item: Mapping[str, Any], name: str, role: str) -> str:
    value = item.get(name) if isinstance(item, Mapping) else None
    if value is None:
        have = ", ".join(sorted(item)) if isinstance(item, Mapping) else type(item).__name__
        raise MissingFieldError(f"{role} field {name!r} is missing; the row has {have or 'no fields'}")
    return str(value)


def _check_fields(prompt_format: PromptFormat, target: str, truncation: str | None, max_tokens: int | None) -> None:
    if target in prompt_format.fields:
        raise UsageError(f"target field {target!r} also appears in the format {prompt_format.template!r}: the model "
                         f"would see the answer it is trained to produce")
    if truncation is not None and truncation not in prompt_format.fields:
        raise UsageError(f"truncation_field={truncation!r} is not a field of the format {prompt_format.template!r}; "
                         f"its fields: {', '.join(prompt_format.fields) or 'none'}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"max_tokens={max_tokens} must be >= 2")
