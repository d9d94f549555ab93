"""`rugpt generate`: continue a text with any decoding strategy, streamed or as JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rugpt.cli.app import ModelOpt, command, out, read_text_arg
from rugpt.cli.options import FromSettings, Opt, choice_option
from rugpt.engines import EngineChoice, describe_engines

GENERATION = FromSettings("rugpt.generation:GenerationSettings", opts={
    "do_sample": Opt("--sample/--no-sample"), "num_return_sequences": Opt("--n")})


PRESET_HELP = "named settings to start from (precise is beam search); the options below override them one by one"


@command
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="text to continue ('-' for stdin)")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="read the prompt from this file")] = None,
    model: ModelOpt = None,
    preset: Annotated[Optional[str], choice_option(
        "rugpt.generation:Preset", "--preset", help=PRESET_HELP, default="balanced")] = None,
    given: Annotated[dict, GENERATION] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (no streaming)")] = False,
    stream: Annotated[bool, typer.Option(help="print tokens as they are produced")] = True,
    prompt_tuned: Annotated[Optional[str], typer.Option(
        help="trained prompt (folder or hub id) to apply; a format with several fields takes the text as JSON")] = None,
    engine: Annotated[str, choice_option(
        EngineChoice, "--engine", help="decode engine — " + describe_engines(), default="auto")] = "auto",
) -> None:
    """Continue a Russian text with the bundled model or any GPT-2-architecture checkpoint."""
    from rugpt.generation import GenerationSettings, Generator

    settings = GenerationSettings.from_preset(preset, **given)
    text = read_text_arg(prompt, file)
    tuned = None
    if prompt_tuned is not None:
        from rugpt.prompts.prompt import Prompt

        tuned = Prompt.from_pretrained(prompt_tuned)
        model = model or tuned.config.pretrained_model_name  # the model the prompt was trained for
    generator = Generator(model, engine=engine)
    model_text = text if tuned is None else tuned.patch(generator.loaded.model, generator.loaded.tokenizer).render(text)
    can_stream = stream and not as_json and settings.num_beams == 1 and settings.num_return_sequences == 1
    if can_stream:
        generator.encode_prompt(model_text, settings.max_new_tokens)  # validate before echoing the prompt
        generator.engine()  # an engine that cannot run this model says so before anything is printed
        out.print(text, end="", style="bold")
        for piece in generator.stream(model_text, settings):
            out.print(piece, end="")
        out.print()
        return
    result = generator.generate(model_text, settings)
    if as_json:
        payload = {
            "model": generator.loaded.name, "engine": result.engine, "prompt": result.prompt,
            "prompt_tokens": result.prompt_tokens, "prompt_truncated": result.prompt_truncated,
            "settings": dataclasses.asdict(settings),
            "completions": [dataclasses.asdict(c) for c in result.completions],
        }
        print(json.dumps(payload, ensure_ascii=False))
        return
    for i, completion in enumerate(result.completions):
        if len(result.completions) > 1:
            out.rule(f"{i + 1}")
        out.print(text, end="", style="bold")
        out.print(completion.text)
