"""Text generation: settings with presets and validation, a reusable `Generator`, streaming.

Every decoding strategy of transformers' `generate` is reachable: greedy, beam search, sampling with
temperature / top-k / top-p, repetition penalty, n-gram blocking; plus stop strings and seeds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rugpt.errors import UsageError
from rugpt.models import LoadedModel, load
from rugpt.sampling import RowSampler, SamplingParams

log = logging.getLogger(__name__)


class Preset(str, Enum):
    """Named starting points for generation, each overridable setting by setting."""

    precise = "precise"  # beam search: definitions, facts, translation — the most likely text
    greedy = "greedy"  # the single most likely token each step, with n-gram blocking against loops
    balanced = "balanced"  # mild sampling: answers, descriptions, most tasks
    creative = "creative"  # freer sampling: stories, poems, conversation


@dataclass
class GenerationSettings:
    """How to decode. Defaults are the 'balanced' preset; `from_preset` starts from another one."""

    max_new_tokens: int = field(default=60, metadata={"help": "how many tokens to generate at most"})
    do_sample: bool = field(default=True, metadata={"help": "sample (True) or take the most likely tokens (False)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature, > 0; lower is safer"})
    top_k: int = field(default=50, metadata={"help": "sample from the k most likely tokens; 0 turns it off"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling: likeliest tokens up to this mass, (0, 1]"})
    repetition_penalty: float = field(default=1.15, metadata={"help": "> 1 discourages repeated tokens; 1 is off"})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "forbid repeating any n-gram of this size; 0 off"})
    num_beams: int = field(default=1, metadata={"help": "beam search width; 1 is no beam search"})
    num_return_sequences: int = field(default=1, metadata={"help": "how many continuations to return"})
    seed: int | None = field(default=None, metadata={"help": "random seed: the same seed gives the same text"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "cut the text before the first of these strings"})

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        self.validate()

    @classmethod
    def from_preset(cls, preset: str | Preset | None = None, **overrides) -> GenerationSettings:
        """Settings of a named preset with some fields replaced; None values in `overrides` are ignored."""
        name = (preset.value if isinstance(preset, Preset) else preset) or Preset.balanced.value
        if name not in PRESETS:
            raise UsageError(f"preset={name!r} is unknown; use one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            names, allowed = ", ".join(sorted(unknown)), ", ".join(sorted(fields))
            raise UsageError(f"unknown generation setting(s) {names}; allowed: {allowed}")
        values = dict(PRESETS[name]) | {k: v for k, v in overrides.items() if v is not None}
        return cls(**values)

    def validate(self) -> None:
        """Raise UsageError naming the first invalid setting and what is allowed."""
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens={self.max_new_tokens} must be > 0"),
            (not self.do_sample or self.temperature > 0, f"temperature={self.temperature} must be > 0 when sampling"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 turns it off)"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 turns it off)"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0"),
            (self.num_beams >= 1, f"num_beams={self.num_beams} must be >= 1"),
            (self.num_return_sequences >= 1, f"num_return_sequences={self.num_return_sequences} must be >= 1"),
            (self.do_sample or self.num_return_sequences <= self.num_beams,
             f"num_return_sequences={self.num_return_sequences} needs sampling or num_beams >= it "
             f"(num_beams={self.num_beams})"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def sampling_params(self) -> SamplingParams:
        """The per-token part of these settings, for rugpt's sampler."""
        return SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p,
                              self.repetition_penalty, self.no_repeat_ngram_size)

    def to_transformers(self) -> dict:
        """Keyword arguments for transformers' `generate`."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.do_sample:
            kwargs |= {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return kwargs


PRESETS: dict[str, dict] = {
    Preset.precise.value: {"do_sample": False, "num_beams": 4, "no_repeat_ngram_size": 3, "repetition_penalty": 1.0},
    Preset.greedy.value: {"do_sample": False, "num_beams": 1, "no_repeat_ngram_size": 3, "repetition_penalty": 1.0},
    Preset.balanced.value: {},
    Preset.creative.value: {"temperature": 1.0, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.1},
}


@dataclass
class Completion:
    """One continuation: its text (cut at a stop string), its token ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string or end-of-text) or "length" (max_new_tokens or context full)


@dataclass
class GenerationResult:
    """What `generate` returns: the completions plus facts about the run."""

    prompt: str
    completions: list[Completion]
    prompt_tokens: int
    prompt_truncated: bool
    engine: str

    @property
    def text(self) -> str:
        return self.completions[0].text

    def __str__(self) -> str:
        return self.text


class Generator:
    """Keeps a model (and its decode engine) loaded; `rugpt.generate` is the one-call version.

    Beam search runs on transformers' `generate`; everything else runs on the decode engine (`engine`:
    auto, transformers, fast, fast-bf16, fast-fp16, fast-int8, llamacpp-f32/-f16/-q8) with rugpt's own sampler.
    """

    def __init__(self, model: LoadedModel | str | None = None, device: str | None = None, dtype: str | None = None,
                 engine: str = "auto"):
        from rugpt.engines import parse_engine

        self.engine_choice = parse_engine(engine)  # before loading: a typo should not cost a model load
        self.loaded = model if isinstance(model, LoadedModel) else load(model, device=device, dtype=dtype)
        self._engine = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def engine(self, rows: int = 1):
        """The decode engine, built on first use (and rebuilt if more rows are needed at once)."""
        from rugpt.engines import create_engine, prompt_patched

        # A trained prompt patched in after the engine was built needs an engine that takes embeddings.
        stale = self._engine is not None and not self._engine.accepts_embeds and prompt_patched(self.loaded)
        if self._engine is None or self._engine.max_rows < rows or stale:
            self._engine = create_engine(self.loaded, self.engine_choice, max_rows=max(rows, 8))
        return self._engine

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> tuple[list[int], bool]:
        """Prompt token ids, keeping the most recent ones when prompt + new tokens exceed the context."""
        if not prompt or not prompt.strip():
            raise UsageError("prompt is empty: give some text to continue")
        context = self.loaded.context_length
        if max_new_tokens >= context:
            raise UsageError(f"max_new_tokens={max_new_tokens} must be < the model's context of {context} tokens")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        budget = context - max_new_tokens
        if len(ids) <= budget:
            return ids, False
        log.warning("prompt has %d tokens; kept the last %d so that %d new tokens fit the context of %d",
                    len(ids), budget, max_new_tokens, context)
        return ids[-budget:], True

    def generate(self, prompt: str, settings: GenerationSettings | None = None, **overrides) -> GenerationResult:
        """Continue `prompt`; `overrides` replace fields of `settings` (default: the balanced preset)."""
        return self.generate_batch([prompt], settings, **overrides)[0]

    def generate_batch(
        self, prompts: list[str], settings: GenerationSettings | None = None, **overrides
    ) -> list[GenerationResult]:
        """Continue several prompts, decoded together in one batch; one result per prompt, in order.

        Each row samples with its own seed (`seed + row`), so a prompt's text does not depend on
        which other prompts share the batch.
        """
        settings = _merge(settings, overrides)
        if not prompts:
            raise UsageError("prompts is empty: give at least one prompt")
        encoded = [self.encode_prompt(p, settings.max_new_tokens) for p in prompts]
        if settings.num_beams > 1:
            return [self._beam_result(p, ids, cut, settings) for p, (ids, cut) in zip(prompts, encoded, strict=True)]
        n = settings.num_return_sequences
        rows = len(prompts) * n
        tokens: list[list[int]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        engine = self.engine(rows)
        for index, token, reason in self.decode([ids for ids, _ in encoded], settings):
            if token is not None:
                tokens[index].append(token)
            if reason is not None:
                finish[index] = reason
        completions = [self._completion(tokens[r], settings, finish[r]) for r in range(rows)]
        return [
            GenerationResult(prompt, completions[i * n : i * n + n], len(ids), truncated, engine.name)
            for i, (prompt, (ids, truncated)) in enumerate(zip(prompts, encoded, strict=True))
        ]

    def stream(self, prompt: str, settings: GenerationSettings | None = None, **overrides) -> Iterator[str]:
        """Yield text pieces of one continuation as they are produced (greedy or sampling, one sequence)."""
        settings = _merge(settings, overrides)
        if settings.num_beams > 1 or settings.num_return_sequences > 1:
            raise UsageError("streaming needs num_beams=1 and num_return_sequences=1; use generate() for beams")
        ids, _ = self.encode_prompt(prompt, settings.max_new_tokens)
        tokens = ([token] for _, token, _ in self.decode([ids], settings) if token is not None)
        yield from StopStringCutter(self.tokenizer, settings.stop).pieces(tokens)

    def decode(
        self, prompts: list[list[int]], settings: GenerationSettings
    ) -> Iterator[tuple[int, int | None, str | None]]:
        """Decode `num_return_sequences` rows per prompt on the engine, all rows stepped together.

        Yields (row index, new token or None, finish reason or None) as tokens are picked; the token
        that ends a row by end-of-text is not yielded. Row r samples with seed `seed + r`.
        """
        n = settings.num_return_sequences
        engine = self.engine(len(prompts) * n)
        params = settings.sampling_params()
        eos = self.tokenizer.eos_token_id
        rows, samplers, logits = [], [], []
        try:
            for ids in prompts:
                embeds = self._prompt_embeds(ids)
                for _ in range(n):
                    row, row_logits = engine.prefill(ids, embeds)
                    seed = None if settings.seed is None else settings.seed + len(rows)
                    rows.append(row)
                    samplers.append(RowSampler(params, ids, seed, engine.sampleable_vocab))
                    logits.append(row_logits)
            active = list(range(len(rows)))
            generated = [0] * len(rows)
            watches = [StopWatch(self.tokenizer, settings.stop) for _ in rows]
            while active:
                step_rows, step_tokens = [], []
                for position, i in enumerate(active):
                    token = samplers[i].next_token(logits[position])
                    if token == eos:
                        yield i, None, "stop"
                        continue
                    generated[i] += 1
                    reason = None
                    if watches[i].add(token):
                        reason = "stop"
                    elif generated[i] >= settings.max_new_tokens or engine.lengths[rows[i]] >= engine.context_length:
                        reason = "length"  # the budget is spent, or the context is full and no step can follow
                    yield i, token, reason
                    if reason is None:
                        step_rows.append(i)
                        step_tokens.append(token)
                active = step_rows
                if active:
                    logits = engine.step([rows[i] for i in active], step_tokens)
        finally:
            for row in rows:
                engine.release(row)

    def _beam_result(self, prompt: str, ids: list[int], truncated: bool, settings: GenerationSettings):
        output = self._beam_search(ids, settings)
        completions = [self._completion(row[len(ids):].tolist(), settings) for row in output]
        return GenerationResult(prompt, completions, len(ids), truncated, "transformers")

    def _prompt_embeds(self, ids: list[int]) -> torch.Tensor | None:
        """Input embeddings when the model's embedding layer is patched (a trained prompt), else None."""
        from rugpt.engines import prompt_patched

        if not prompt_patched(self.loaded):  # never builds a GGUF model's torch module just to ask
            return None
        layer = self.loaded.model.get_input_embeddings()
        with torch.inference_mode():
            return layer(torch.tensor([ids], device=self.loaded.model.device))[0]

    @torch.inference_mode()
    def _beam_search(self, ids: list[int], settings: GenerationSettings) -> torch.Tensor:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        model = self.loaded.model
        input_ids = torch.tensor([ids], device=model.device)
        kwargs = settings.to_transformers()
        if settings.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(self.tokenizer, settings.stop, len(ids))])
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )

    def _completion(self, new_ids: list[int], settings: GenerationSettings, finish: str | None = None) -> Completion:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ended = eos in new_ids
        if ended:
            new_ids = new_ids[: new_ids.index(eos)]
        while new_ids and new_ids[-1] == pad:
            new_ids.pop()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = cut_at_stop(text, settings.stop)
        if finish is None:
            finish = "stop" if ended or cut != text or len(new_ids) < settings.max_new_tokens else "length"
        return Completion(cut, new_ids, finish)


class StopWatch:
    """Tracks one row's generated text and says when it first contains a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids = tokenizer, stop, []

    def add(self, token: int) -> bool:
        if not self.stop:
            return False
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return any(s in text for s in self.stop)


class StopOnStrings(StoppingCriteria):
    """Ends a beam once its generated text (never the prompt) contains a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    positions = [text.find(s) for s in stop if s in text]
    return text[: min(positions)] if positions else text


class StopStringCutter:
    """Turns token ids into text pieces, holding back what may be the start of a stop string.

    Push tokens as they come (`push`, then `finish`), or pull pieces from an iterator of token batches
    (`pieces`); the pieces joined are the generated text cut at the first stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False  # a stop string came: nothing more is released

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that became safe to show (often empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = cut_at_stop(text, self.stop)
        if cut != text:
            self.stopped = True
            return self._release(cut, len(cut))
        safe = len(text) - self._held_back(text)
        if text.endswith("\ufffd"):  # a multi-byte character split between tokens: wait for the rest
            safe = min(safe, len(text) - 1)
        return self._release(text, safe)

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        if self.stopped:
            return ""
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)
        return self._release(text, len(text))

    def pieces(self, token_batches) -> Iterator[str]:
        for batch in token_batches:
            if piece := self.push(batch):
                yield piece
            if self.stopped:
                return
        if piece := self.finish():
            yield piece

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = text[self.sent:upto], upto
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest


def _merge(settings: GenerationSettings | None, overrides: dict) -> GenerationSettings:
    base = settings or GenerationSettings()
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(GenerationSettings)}
    if unknown:
        raise UsageError(f"unknown generation setting(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **changes) if changes else base


def generate(
    prompt: str, model: str | LoadedModel | None = None, preset: str | None = None, engine: str = "auto", **settings
) -> GenerationResult:
    """Continue `prompt` with `model` (the bundled one by default), a preset and setting overrides."""
    return Generator(model, engine=engine).generate(prompt, GenerationSettings.from_preset(preset, **settings))
