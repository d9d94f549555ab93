"""Fine-tuning data: read texts (.txt, a folder of .txt, .jsonl with a template), tokenise, pack into blocks.

Packing follows the GPT pre-training recipe: every document is followed by the end-of-text token and the
stream is cut into fixed-length blocks, so no compute is spent on padding (only the last block is padded,
and padding is never a target). A per-token target mask carries "loss on the answer only" through packing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rugpt.errors import DataError, UsageError
from rugpt.templates import SYNTAX, Template
from rugpt.training.settings import FinetuneSettings, LossOn

DEFAULT_TEMPLATE = "{text}"
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Example:
    """One document: its text and the character offset from which its tokens are targets (0: all of them)."""

    text: str
    answer_start: int = 0


@dataclass
class Blocks:
    """Packed data. tokens: [n, block] token ids; targets: [n, block] True where the token is predicted."""

    tokens: torch.Tensor
    targets: torch.Tensor
    documents: int
    token_count: int  # tokens of the documents, end-of-text included, padding not

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def target_count(self) -> int:
        return int(self.targets[:, 1:].sum())  # the first token of a block has no context to be predicted from

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.tokens.numpy().tobytes())
        digest.update(self.targets.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass
class FinetuneData:
    """Training blocks, held-out blocks (None when there is no evaluation) and the block size used."""

    train: Blocks
    heldout: Blocks | None
    block_size: int


def read_examples(path: Path, template: str | None = None, loss_on: LossOn = LossOn.all) -> list[Example]:
    """Documents of a .txt file (split at blank lines), a folder of .txt files (one each) or a .jsonl file."""
    if path.is_dir():
        if loss_on == LossOn.answer:
            raise UsageError("loss_on='answer' needs a .jsonl file with a template; a folder of .txt has no answers")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {str(path)!r} has no .txt files")
        examples = [Example(text) for text in (_read_utf8(f).strip() for f in files) if text]
    elif path.suffix == ".jsonl":
        examples = _read_jsonl_examples(path, template or DEFAULT_TEMPLATE, loss_on)
    elif path.is_file():
        if loss_on == LossOn.answer or template:
            raise UsageError(f"template and loss_on='answer' need a .jsonl file; {str(path)!r} is plain text")
        examples = [Example(doc.strip()) for doc in _BLANK_LINES.split(_read_utf8(path)) if doc.strip()]
    else:
        raise DataError(f"data {str(path)!r} does not exist; give a .txt or .jsonl file or a folder of .txt files")
    if not examples:
        raise DataError(f"{str(path)!r} holds no text: every document is empty")
    return examples


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # -sig strips a byte-order mark, so the offset we report is into the raw file either way.
        offset = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        raise DataError(f"{path}: not UTF-8 text at byte offset {offset} (byte 0x{raw[offset]:02x}); "
                        f"convert it, e.g. `iconv -f cp1251 -t utf-8`") from None
    return text.replace("\r\n", "\n")


def parse_template(template: str) -> Template:
    """A fine-tuning template such as 'Q: {question}\\nA: {answer}' under rugpt's one template rule
    (rugpt.templates); it needs at least one field, the last of which is where the answer starts."""
    parsed = Template(template)
    if not parsed.fields:
        raise UsageError(f"template {template!r} has no field: a .jsonl row becomes text through its fields; {SYNTAX}")
    return parsed


def render(template: Template, row: dict, where: str) -> Example:
    """Fill a template from one JSONL row; the answer starts where the template's last field does."""
    last, text, answer_start = template.fields[-1], "", 0
    for piece, name in template.pieces(row, where, DataError):
        if name == last:
            answer_start = len(text)
        text += piece
    return Example(text, answer_start)


def _read_jsonl_examples(path: Path, template: str, loss_on: LossOn) -> list[Example]:
    from rugpt.jsonl import iter_jsonl

    parsed = parse_template(template)  # a malformed template is the user's first mistake to hear about
    examples = []
    for line, row in iter_jsonl(path):
        try:
            example = render(parsed, row, f"{path}:{line}")
        except DataError:
            _refuse_unknown_fields(parsed, path)
            raise
        if loss_on == LossOn.all:
            example = Example(example.text)
        if example.text.strip():
            examples.append(example)
    return examples


def _refuse_unknown_fields(template: Template, path: Path) -> None:
    """A field that no row has is the template's mistake (a typo, say): a UsageError listing the fields the
    rows do have, as classify and recommend word theirs. Runs only once a row has failed to fill."""
    from rugpt.jsonl import iter_jsonl

    fields: set[str] = set()
    try:
        for _, row in iter_jsonl(path):
            fields.update(name for name, value in row.items() if value is not None)
    except DataError:
        return  # a broken line further on: the row that failed first is the error to report
    template.require(allowed=fields)


def tokenize(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each example followed by end-of-text, and which of them are targets.

    A token is a target when it ends after the example's answer start, so a token that spans the
    boundary (such as ' yes' after 'A:') is learnt with the answer.
    """
    eot = tokenizer.eos_token_id
    if eot is None:
        raise UsageError("the tokenizer has no end-of-text token; it is needed between packed documents")
    masked = any(e.answer_start for e in examples)  # offsets cost memory; only answer-only training needs them
    encoded = tokenizer([e.text for e in examples], add_special_tokens=False, return_offsets_mapping=masked,
                        verbose=False)
    spans = encoded["offset_mapping"] if masked else [None] * len(examples)
    out = []
    for example, ids, offsets in zip(examples, encoded["input_ids"], spans, strict=True):
        targets = [end > example.answer_start for _, end in offsets] if masked else [True] * len(ids)
        out.append((list(ids) + [eot], targets + [True]))
    return out


def pack_into_blocks(docs: list[tuple[list[int], list[bool]]], block_size: int, eot_id: int) -> Blocks:
    """Concatenate the documents (each already ending in end-of-text) and cut the stream into blocks.

    The last block is padded with end-of-text tokens that are not targets.
    """
    ids = [t for doc_ids, _ in docs for t in doc_ids]
    targets = [m for _, doc_targets in docs for m in doc_targets]
    padding = -len(ids) % block_size
    ids += [eot_id] * padding
    targets += [False] * padding
    # int32 halves the memory of a large corpus; batches are widened to int64 when used.
    tokens = torch.tensor(ids, dtype=torch.int32).view(-1, block_size)
    targets_tensor = torch.tensor(targets, dtype=torch.bool).view(-1, block_size)
    return Blocks(tokens, targets_tensor, documents=len(docs), token_count=len(ids) - padding)


def split_heldout(examples: list[Example], fraction: float, seed: int, path: Path) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` of the documents, at least one, is held out."""
    if fraction == 0:
        return examples, []
    if len(examples) < 2:
        raise DataError(f"{str(path)!r} has 1 document, and a held-out split needs 2 or more: separate documents "
                        f"with a blank line, give --eval-data, or set --eval-fraction 0")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    count = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    heldout = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in heldout],
            [e for i, e in enumerate(examples) if i in heldout])


def resolve_block_size(requested: int | None, context: int) -> int:
    """The block size to train with: the requested one, checked against the model's context, or the default."""
    from rugpt.training.settings import MAX_BLOCK_SIZE

    if requested is None:
        return min(context, MAX_BLOCK_SIZE)
    if requested > context:
        raise UsageError(f"block_size={requested} is over the model's context of {context} tokens; "
                         f"use {context} or less")
    return requested


def load_data(settings: FinetuneSettings, tokenizer, context: int) -> FinetuneData:
    """Read, split, tokenise and pack the training and held-out texts the settings name."""
    block_size = resolve_block_size(settings.block_size, context)
    examples = read_examples(settings.data, settings.template, settings.loss_on)
    if settings.eval_data is not None:
        train, heldout = examples, read_examples(settings.eval_data, settings.template, settings.loss_on)
    else:
        train, heldout = split_heldout(examples, settings.eval_fraction, settings.seed, settings.data)
    eot = tokenizer.eos_token_id
    train_blocks = pack_into_blocks(tokenize(tokenizer, train), block_size, eot)
    if train_blocks.target_count == 0:
        raise DataError(f"{str(settings.data)!r} leaves nothing to learn: no target tokens (empty answers?)")
    heldout_blocks = pack_into_blocks(tokenize(tokenizer, heldout), block_size, eot) if heldout else None
    return FinetuneData(train_blocks, heldout_blocks, block_size)
