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

from rugpt.decoding import RowDecoder, RowSettings, RowStep, advance, cut_at_stop, start_row
from rugpt.errors import UsageError
from rugpt.models import LoadedModel, load
from rugpt.sampling import SEED_SPACE, SamplingParams
from rugpt.speculative import SpeculatingRow, SpeculationStats, Speculator, advance_speculating

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
    speculate: str | None = field(default=None, metadata={"help": (
        "speculative decoding: 'lookup' drafts from the prompt and text so far, or a smaller model of the same "
        "tokenizer (name or path) drafts; the same text as without (greedy) or the same distribution (sampling)")})

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
            # beam search returns at most num_beams sequences, sampling or not; without beams only sampling varies
            (self.num_return_sequences <= self.num_beams if self.num_beams > 1
             else self.do_sample or self.num_return_sequences == 1,
             f"num_return_sequences={self.num_return_sequences} needs sampling without beams (num_beams=1) or "
             f"num_beams >= it (num_beams={self.num_beams})"),
            (all(self.stop), "stop strings must not be empty"),
            # transformers' beam sampling raises on extreme temperatures and top_p (NaN probabilities) where
            # rugpt's own sampler does not: beams are the deterministic search, sampling runs without them.
            (self.num_beams == 1 or not self.do_sample,
             f"num_beams={self.num_beams} with do_sample=True: beam search is deterministic here; use "
             f"do_sample=False for beams, or num_beams=1 to sample"),
            (self.speculate is None or bool(self.speculate.strip()),
             "speculate must be 'lookup' or a draft model's name or path, not empty"),
            (self.speculate is None or self.num_beams == 1,
             f"speculate={self.speculate!r} with num_beams={self.num_beams}: speculative decoding replaces greedy "
             f"or sampled decoding, not beam search; use num_beams=1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def sampling_params(self) -> SamplingParams:
        """The per-token part of these settings, for rugpt's sampler."""
        return SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p,
                              self.repetition_penalty, self.no_repeat_ngram_size)

    def row_settings(self) -> RowSettings:
        """What the decode core needs of these settings for each row."""
        return RowSettings(self.sampling_params(), self.max_new_tokens, self.stop)

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
            kwargs |= {"temperature": min(max(self.temperature, BEAM_TEMPERATURES[0]), BEAM_TEMPERATURES[1]),
                       "top_k": self.top_k, "top_p": self.top_p}
        return kwargs


# transformers' beam sampling scales log-probabilities by 1 / temperature and sums them over steps, which
# overflows to NaN for extreme temperatures; these bounds are already as greedy / as uniform as sampling gets.
BEAM_TEMPERATURES = (1e-4, 1e4)

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
    speculation: SpeculationStats | None = None  # drafted / accepted tokens when `speculate` was set

    @property
    def text(self) -> str:
        return self.completions[0].text

    def __str__(self) -> str:
        return self.text


class Generator:
    """Keeps a model (and its decode engine) loaded; `rugpt.generate` is the one-call version.

    Beam search runs on transformers' `generate`; everything else runs on the decode engine (`engine`: a
    name of `rugpt.engines.EngineChoice`, which lists them with their descriptions) with rugpt's own sampler.
    """

    def __init__(self, model: LoadedModel | str | None = None, device: str | None = None, dtype: str | None = None,
                 engine: str = "auto"):
        from rugpt.engines import parse_engine

        self.engine_choice = parse_engine(engine)  # before loading: a typo should not cost a model load
        self.loaded = model if isinstance(model, LoadedModel) else load(model, device=device, dtype=dtype)
        self._engine = None
        self._speculators: dict[str, Speculator] = {}  # by `speculate`: a draft model loads once

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
        finished: dict[int, RowDecoder] = {}
        stats: list[SpeculationStats] = []
        for index, row, step in self._decode_rows([ids for ids, _ in encoded], settings, stats):
            if step.finish is not None:
                finished[index] = row
        rows = [finished[i] for i in range(len(finished))]
        completions = [Completion(row.text, row.ids, row.finish_reason) for row in rows]
        engine = self.engine(len(rows)).name
        speculation = [sum(stats[i * n : i * n + n], SpeculationStats()) if stats else None
                       for i in range(len(prompts))]
        return [
            GenerationResult(prompt, completions[i * n : i * n + n], len(ids), truncated, engine, speculation[i])
            for i, (prompt, (ids, truncated)) in enumerate(zip(prompts, encoded, strict=True))
        ]

    def stream(self, prompt: str, settings: GenerationSettings | None = None, **overrides) -> Iterator[str]:
        """Yield text pieces of one continuation as they are produced (greedy or sampling, one sequence)."""
        settings = _merge(settings, overrides)
        if settings.num_beams > 1 or settings.num_return_sequences > 1:
            raise UsageError("streaming needs num_beams=1 and num_return_sequences=1; use generate() for beams")
        ids, _ = self.encode_prompt(prompt, settings.max_new_tokens)
        for _, _, step in self._decode_rows([ids], settings):
            if step.piece:
                yield step.piece

    def decode(
        self, prompts: list[list[int]], settings: GenerationSettings
    ) -> Iterator[tuple[int, int | None, str | None]]:
        """Decode `num_return_sequences` rows per prompt on the engine, all rows stepped together.

        Yields (row index, new token or None, finish reason or None) as tokens are picked; the token
        that ends a row by end-of-text is not yielded. Row r samples with seed `seed + r`.
        """
        for index, _, step in self._decode_rows(prompts, settings):
            yield index, step.token, step.finish

    def _decode_rows(self, prompts: list[list[int]], settings: GenerationSettings,
                     stats: list[SpeculationStats] | None = None) -> Iterator[tuple[int, RowDecoder, RowStep]]:
        """Rows of the decode core for `prompts`, stepped together until all finish.

        Yields (row index, the row, its step) for every pick; a row whose pick fails raises its error here
        (one call, one caller: nobody else's rows to protect). With `settings.speculate` each row drafts and
        checks several tokens per engine call; its SpeculationStats go into `stats`, one per row."""
        n = settings.num_return_sequences
        engine = self.engine(len(prompts) * n)
        speculator = self.speculator(settings.speculate) if settings.speculate else None
        row_settings = settings.row_settings()
        rows: list[RowDecoder] = []
        speculating: list[SpeculatingRow] = []
        try:
            if speculator is not None:
                speculator.reserve(len(prompts) * n)
            for ids in prompts:
                embeds = self._prompt_embeds(ids)
                for _ in range(n):
                    seed = None if settings.seed is None else settings.seed + len(rows)
                    rows.append(start_row(engine, self.tokenizer, ids, row_settings, seed, embeds))
                    if speculator is not None:
                        speculating.append(speculator.start(rows[-1], ids, engine.sampleable_vocab))
            if stats is not None:
                stats.extend(row.stats for row in speculating)
            active = list(enumerate(rows))
            while active:
                if speculating:
                    outcomes = advance_speculating(engine, [speculating[i] for i, _ in active], speculator.costs)
                else:
                    outcomes = [o if isinstance(o, Exception) else [o] for o in advance(engine, [r for _, r in active])]
                going = []
                for (index, row), steps in zip(active, outcomes, strict=True):
                    if isinstance(steps, Exception):
                        raise steps
                    for step in steps:
                        yield index, row, step
                    if steps[-1].finish is None:
                        going.append((index, row))
                active = going
        finally:
            for row in rows:
                engine.release(row.engine_row)
            for row in speculating:
                row.release()

    def speculator(self, speculate: str) -> Speculator:
        """What drafts for `speculate` ('lookup' or a draft model, loaded once and kept)."""
        if speculate not in self._speculators:
            self._speculators[speculate] = Speculator(speculate, self.loaded, self.engine_choice)
        return self._speculators[speculate]

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
            torch.manual_seed(settings.seed % SEED_SPACE)
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

    def _completion(self, new_ids: list[int], settings: GenerationSettings) -> Completion:
        """A beam's completion: transformers pads beams and keeps end-of-text; the decode core does neither."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ended = eos in new_ids
        if ended:
            new_ids = new_ids[: new_ids.index(eos)]
        while new_ids and new_ids[-1] == pad:
            new_ids.pop()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = cut_at_stop(text, settings.stop)
        finish = "stop" if ended or cut != text or len(new_ids) < settings.max_new_tokens else "length"
        return Completion(cut, new_ids, finish)


class StopOnStrings(StoppingCriteria):
    """Ends a beam once its generated text (never the prompt) contains a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


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
