"""Turn data rows into token ids and loss labels for prompt tuning (ruprompts.preprocessing).

Text2TextPreprocessor is ruPrompts': format a row, append its target and end-of-text, label only the
target; with `max_tokens` and `truncation_field`, that field loses as many tokens at its end as the row
exceeds by. Use it with `dataset.map(preprocessor)` and `Trainer(data_collator=preprocessor.collate_fn())`.

Two differences, both deliberate: the formatted row and the target are tokenized separately and joined,
so the label mask is exact and training sees the tokens generation will see (ruPrompts tokenized them
as one string); and a row that cannot fit, or that uses the prompt before the tokenizer knows its token,
is an error instead of a silently longer or garbled row. rugpt adds ClassificationPreprocessor.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rugpt.errors import UsageError
from rugpt.prompts.errors import MissingFieldError, PromptUsageError
from rugpt.prompts.prompt_format import BasePromptFormat
from rugpt.training.loss import IGNORE_INDEX  # the label the loss skips (PyTorch's and transformers' -100)


class BasePreprocessor(abc.ABC):
    def __call__(self, items: Mapping[str, Any] | list[Mapping[str, Any]]):
        """One row → one result; a list of rows → a list of results; a dict of columns (datasets'
        `map(batched=True)`) → a dict of columns."""
        if isinstance(items, list):
            return [self.process(item) for item in items]
        if isinstance(items, Mapping) and items and all(isinstance(v, list) for v in items.values()):
            return self.batch_process(items)
        return self.process(items)

    @abc.abstractmethod
    def process(self, item: Mapping[str, Any]) -> dict[str, Any]: ...

    def batch_process(self, item: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Columns in, columns out: `{"text": [...], "target": [...]}` → `{"input_ids": [...], ...}`."""
        size = len(next(iter(item.values())))
        rows = [self.process({key: values[i] for key, values in item.items()}) for i in range(size)]
        return {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}

    @abc.abstractmethod
    def collate_fn(self) -> Callable: ...


class TruncationMixin:
    """The truncation settings of a preprocessor: `truncation_field` loses tokens at its end to fit `max_tokens`."""

    truncation_field: str | None
    max_tokens: int | None

    @property
    def is_truncation_enabled(self) -> bool:
        return self.truncation_field is not None and self.max_tokens is not None


@dataclass
class Text2TextPreprocessor(BasePreprocessor, TruncationMixin):
    """Carries out preprocessing for text2text tasks: format, append the target, tokenize, truncate.

    >>> preprocessor = Text2TextPreprocessor(prompt_format=prompt_format, tokenizer=tokenizer,
    ...     target_field="summary", max_tokens=1024, truncation_field="text")
    >>> dataset = dataset.map(preprocessor)

    Without a truncation field, a target too long for `max_tokens` is cut instead (rugpt).
    """

    prompt_format: BasePromptFormat
    tokenizer: Any
    target_field: str
    max_tokens: int | None = None
    truncation_field: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self.prompt_format, self.target_field, self.truncation_field, self.max_tokens)

    def process(self, item: Mapping[str, Any]) -> dict[str, list[int]]:
        target = _field_text(item, self.target_field, "target")
        target_ids = _ids(self.tokenizer, target) + [self.tokenizer.eos_token_id]
        prompt_ids = _prompt_ids(self, item, reserve=len(target_ids))
        if self.max_tokens is not None:
            target_ids = target_ids[: self.max_tokens - len(prompt_ids)]
        ids = prompt_ids + target_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}

    def collate_fn(self, **kwargs: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """transformers' DataCollatorForSeq2Seq, as ruPrompts: pads to the longest row on the tokenizer's
        padding side, labels with -100; `kwargs` go to it (pad_to_multiple_of=...)."""
        from transformers import DataCollatorForSeq2Seq

        if self.tokenizer.pad_token is None:
            raise PromptUsageError("the tokenizer has no pad token, which batches need: set one, e.g. "
                                   "tokenizer.pad_token = tokenizer.eos_token")
        return DataCollatorForSeq2Seq(tokenizer=self.tokenizer, return_tensors="pt", **kwargs)


@dataclass
class ClassificationPreprocessor(BasePreprocessor, TruncationMixin):
    """rugpt: format a row once per label word (e.g. «Да», «Нет»); the loss is cross-entropy over the label
    words' log-likelihoods as continuations of the formatted row."""

    prompt_format: BasePromptFormat
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
        pad = pad_token_id(self.tokenizer)

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = pad_right([choice for row in rows for choice in row["choices"]], pad)  # [B * n_labels, T]
            batch["label"] = torch.tensor([row["label"] for row in rows])
            return batch

        return collate


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_right(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows of input_ids / attention_mask / labels, padding on the right (pad, 0, -100)."""
    width = max(len(row["input_ids"]) for row in rows)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])
            for key, value in fill.items()}


def _prompt_ids(pre: Text2TextPreprocessor | ClassificationPreprocessor, item: Mapping[str, Any],
                reserve: int) -> list[int]:
    """Token ids of the formatted row; with truncation on, the truncation field's last tokens are dropped so
    that `reserve` more tokens fit in max_tokens (ruPrompts' TruncationMixin.truncate)."""
    fmt = pre.prompt_format
    if fmt.is_initialized and fmt.prompt_length and pre.tokenizer.convert_tokens_to_ids(fmt.prompt_token) in (
            None, pre.tokenizer.unk_token_id):
        raise PromptUsageError(f"the tokenizer does not know the prompt token {fmt.prompt_token!r}: call "
                               f"prompt.patch(model, tokenizer) (or format.add_tokens(tokenizer)) before preprocessing")
    text, ranges = fmt(item, return_ranges=True)
    if not pre.is_truncation_enabled:
        ids = _ids(pre.tokenizer, text)
    else:
        encoding = pre.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        excess = len(ids) + reserve - pre.max_tokens
        if excess > 0:
            span = ranges[pre.truncation_field]
            inside = [i for i, (start, _) in enumerate(encoding["offset_mapping"]) if span.start <= start < span.stop]
            if len(inside) < excess:
                without = len(ids) - len(inside) + reserve
                raise UsageError(f"the row does not fit max_tokens={pre.max_tokens} even with "
                                 f"{pre.truncation_field!r} empty: {without} tokens without it")
            cut = inside[len(inside) - excess : len(inside)]  # the field's last tokens (contiguous)
            ids = ids[: cut[0]] + ids[cut[-1] + 1 :]
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


def _check_fields(prompt_format: BasePromptFormat, target: str, truncation: str | None,
                  max_tokens: int | None) -> None:
    fields = getattr(prompt_format, "fields", None)
    if fields is None:  # a format of the user's own: nothing to check against
        return
    if target in fields:
        raise UsageError(f"target field {target!r} also appears in the format {prompt_format.template!r}: the model "
                         f"would see the answer it is trained to produce")
    if truncation is not None and truncation not in fields:
        raise UsageError(f"truncation_field={truncation!r} is not a field of the format {prompt_format.template!r}; "
                         f"its fields: {', '.join(fields) or 'none'}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"max_tokens={max_tokens} must be >= 2")
