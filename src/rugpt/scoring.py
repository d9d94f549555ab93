"""Score texts with a language model: log-likelihood, mean token loss, perplexity, per-token log-probs.

Every request is a context and a target: each target token is scored given the context and the
target tokens before it. A plain text is a target after the begin-of-text token; classification
scores a label as the target after its prompt. Sequences longer than the model's window are scored
with a sliding window (the "perplexity of fixed-length models" recipe in the transformers docs):
every target token is scored exactly once, with at least `window - stride` tokens before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from rugpt.errors import UsageError
from rugpt.models import LoadedModel, load
from rugpt.sampling import TokenLogprobs, token_logprobs


@dataclass
class ScoreSettings:
    """How to score. The window defaults to the model's context, the stride to half the window."""

    batch_size: int = field(default=8, metadata={"help": "windows scored together in one forward pass"})
    window: int | None = field(default=None, metadata={"help": "tokens the model sees at once (default: its context)"})
    stride: int | None = field(
        default=None, metadata={"help": "tokens a sliding window moves on long texts (default: half the window)"}
    )
    prepend_bos: bool = field(
        default=True, metadata={"help": "condition on the begin-of-text token so the first token is scored too"}
    )
    token_details: bool = field(default=False, metadata={"help": "also return every token's log-prob"})

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.window is None or self.window >= 2, f"window={self.window} must be >= 2 tokens"),
            (self.stride is None or self.stride >= 1, f"stride={self.stride} must be >= 1"),
            (self.stride is None or self.window is None or self.stride < self.window,
             f"stride={self.stride} must be < window={self.window} so that each window has context"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def window_and_stride(self, context_length: int) -> tuple[int, int]:
        """The window and stride to use with a model of `context_length` tokens."""
        window = self.window or context_length
        if window > context_length:
            raise UsageError(f"window={window} is larger than the model's context of {context_length} tokens")
        stride = self.stride or max(1, window // 2)
        if stride >= window:
            raise UsageError(f"stride={stride} must be < window={window} so that each window has context")
        return window, stride


@dataclass(frozen=True)
class TokenLogProb:
    """One scored token: its id, the text it decodes to and its log-probability (natural log)."""

    id: int
    token: str
    logprob: float


@dataclass
class TextScore:
    """How likely a text is under the model; `perplexity` is exp of the mean token loss."""

    text: str
    num_tokens: int
    log_likelihood: float
    windows: int
    tokens: list[TokenLogProb] | None = None

    @property
    def mean_loss(self) -> float:
        return -self.log_likelihood / self.num_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)

    def to_dict(self) -> dict:
        data = asdict(self) | {"mean_loss": self.mean_loss, "perplexity": self.perplexity}
        if self.tokens is None:
            del data["tokens"]
        return data


@dataclass(frozen=True)
class Window:
    """A slice [start, end) of a token sequence fed to the model; positions first_target..end-1 are scored."""

    start: int
    end: int
    first_target: int


def plan_windows(length: int, first_target: int, window: int, stride: int) -> list[Window]:
    """Cover target positions first_target..length-1 of a sequence, each exactly once.

    A position p is predicted by the logits at p - 1, so a window must start before its first target.
    The first window scores as many targets as fit (its context is cut from the left, most recent kept);
    each later window scores the next `stride` targets with the `window - stride` tokens before them.
    """
    if not 1 <= first_target < length:
        raise ValueError(f"first_target={first_target} must be in [1, {length})")
    end = min(length, first_target + window - 1)
    windows = [Window(max(0, end - window), end, first_target)]
    while end < length:
        new_end = min(length, end + stride)
        windows.append(Window(new_end - window, new_end, end))
        end = new_end
    return windows


class Scorer:
    """Keeps a model loaded and scores texts with it; `rugpt.score` is the one-call version."""

    def __init__(self, model: LoadedModel | str | None = None, device: str | None = None, dtype: str | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load(model, device=device, dtype=dtype)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def score(self, texts: Sequence[str], settings: ScoreSettings | None = None) -> list[TextScore]:
        """Log-likelihood, mean loss and perplexity of each text (and per-token log-probs if asked)."""
        settings = settings or ScoreSettings()
        requests = [self._text_request(i, text, settings) for i, text in enumerate(texts, start=1)]
        window, stride = settings.window_and_stride(self.loaded.context_length)
        results = self._logprobs(requests, window, stride, settings.batch_size)
        scores = []
        for text, (ids, first), (logprobs, windows) in zip(texts, requests, results, strict=True):
            tokens = self._token_details(ids[first:], logprobs) if settings.token_details else None
            scores.append(TextScore(text, len(logprobs), sum(logprobs), windows, tokens))
        return scores

    def _token_details(self, ids: list[int], logprobs: list[float]) -> list[TokenLogProb]:
        # A token that ends inside a multi-byte letter decodes to '\ufffd' alone; that is what it holds.
        return [TokenLogProb(i, self.tokenizer.decode([i]), lp) for i, lp in zip(ids, logprobs, strict=True)]

    def target_logprobs(
        self, pairs: Sequence[tuple[str, str]], settings: ScoreSettings | None = None
    ) -> list[list[float]]:
        """For each (context, target), the log-prob of every target token given all that precedes it.

        Context and target are tokenized apart, so a target's tokens are the same after any context.
        """
        settings = settings or ScoreSettings()
        requests = []
        for context, target in pairs:
            context_ids = self._encode(context)
            target_ids = self._encode(target)
            if not target_ids:
                raise UsageError(f"nothing to score after context {context[-40:]!r}: the target is empty")
            prefix = self._bos(settings) + context_ids
            if not prefix:
                raise UsageError("an empty context needs prepend_bos=True to score the first token")
            requests.append((prefix + target_ids, len(prefix)))
        window, stride = settings.window_and_stride(self.loaded.context_length)
        return [logprobs for logprobs, _ in self._logprobs(requests, window, stride, settings.batch_size)]

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprobs | None]:
        """Each token of `ids` given those before it, with its `top` likeliest alternatives; None for the first,
        which nothing predicts. One forward pass: `ids` must fit the model's context (the server's echo)."""
        ids = list(ids)
        if len(ids) > self.loaded.context_length:
            raise UsageError(f"{len(ids)} tokens do not fit the model's context of {self.loaded.context_length}")
        if len(ids) < 2:
            return [None] * len(ids)
        logits = self._logits([(ids, 1)])[0, : len(ids) - 1]
        vocab = getattr(self.loaded, "sampleable_vocab", None)
        return [None, *token_logprobs(logits, ids[1:], top, vocab)]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _bos(self, settings: ScoreSettings) -> list[int]:
        if not settings.prepend_bos:
            return []
        bos = self.tokenizer.bos_token_id
        return [self.tokenizer.eos_token_id if bos is None else bos]

    def _text_request(self, number: int, text: str, settings: ScoreSettings) -> tuple[list[int], int]:
        if not text or not text.strip():
            raise UsageError(f"text #{number} is empty: nothing to score")
        ids = self._bos(settings) + self._encode(text)
        if len(ids) < 2:
            raise UsageError(f"text #{number} is a single token: score it with prepend_bos=True (the CLI's default)")
        return ids, 1

    def _logprobs(
        self, requests: list[tuple[list[int], int]], window: int, stride: int, batch_size: int
    ) -> list[tuple[list[float], int]]:
        """Per request: the target log-probs in order and how many windows they took."""
        rows: list[tuple[int, list[int], int]] = []  # (request index, window ids, first scored index in them)
        for index, (ids, first) in enumerate(requests):
            for w in plan_windows(len(ids), first, window, stride):
                rows.append((index, ids[w.start : w.end], w.first_target - w.start))
        # Similar lengths together waste less compute on padding; results go back in request order.
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]), reverse=True)
        row_logprobs: list[list[float]] = [[] for _ in rows]
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            for r, logprobs in zip(batch, self._forward([rows[r][1:] for r in batch]), strict=True):
                row_logprobs[r] = logprobs
        results: list[tuple[list[float], int]] = [([], 0) for _ in requests]
        for (index, _, _), logprobs in zip(rows, row_logprobs, strict=True):
            done, windows = results[index]
            results[index] = (done + logprobs, windows + 1)
        return results

    @torch.inference_mode()
    def _forward(self, rows: list[tuple[list[int], int]]) -> list[list[float]]:
        """Score a batch of rows: the log-prob of each token from its row's `first` on."""
        logits = self._logits(rows)
        results = []
        for r, (ids, first) in enumerate(rows):
            # logits[p - 1] predicts token p: [targets, vocab] in float32, whatever the model's dtype.
            predicting = logits[r, first - 1 : len(ids) - 1].float().log_softmax(dim=-1)
            targets = torch.tensor(ids[first:], device=predicting.device)
            results.append(predicting.gather(1, targets[:, None])[:, 0].tolist())
        return results

    @torch.inference_mode()
    def _logits(self, rows: list[tuple[list[int], int]]) -> torch.Tensor:
        """The model's logits [rows, longest, vocab] over a batch of rows right-padded: real tokens keep
        positions 0..n-1 and never see the padding."""
        model = self.loaded.model
        longest = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        return model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits


def score(
    texts: str | Sequence[str], model: str | LoadedModel | None = None, **settings
) -> TextScore | list[TextScore]:
    """Score one text (returns a TextScore) or several (returns a list) with `model` (the bundled one by default)."""
    single = isinstance(texts, str)
    results = Scorer(model).score([texts] if single else list(texts), ScoreSettings(**settings))
    return results[0] if single else results
