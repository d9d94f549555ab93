"""PEFT interchange: a trained prompt as a PEFT prompt-tuning adapter, and such an adapter as a prompt.

PEFT's prompt tuning (PromptTuningConfig, task CAUSAL_LM) puts N trained vectors before the input
embeddings. A rugpt prompt whose trainable tokens all come first (a format that starts with its N
prompt tokens and has none after: "<P*20>", "<P*20>{text}", "<P*8>Вопрос: {question}") is the same
computation. Export writes adapter_config.json and adapter_model.safetensors ("prompt_embeddings",
[N, hidden]), which `peft.PeftModel.from_pretrained` loads and which gives the same logits; PEFT itself
is not needed to write it. The rest of the format (its text and fields) is what the PEFT user feeds as
input; rugpt keeps it in a prompt.json beside the adapter, which PEFT ignores.

Import reads such a folder — or one PEFT wrote for prompt tuning or P-tuning (whose saved rows are its
encoder's output) — as a TensorPromptProvider with the format of that prompt.json, else "<P*N>{text}".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rugpt.errors import DataError, UsageError
from rugpt.prompts.prompt_format import PROMPT_TOKEN, BasePromptFormat, Slot
from rugpt.prompts.prompt_provider import TensorPromptProvider

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_KEY = "prompt_embeddings"  # the key PEFT saves prompt-learning rows under
_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


def is_peft_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def leading_prompt_length(prompt_format: BasePromptFormat) -> int | None:
    """N when the format's trainable tokens are exactly its first N tokens, else None."""
    segments = getattr(prompt_format, "_segments", None)
    if not segments or not prompt_format.is_initialized:
        return None
    n = 0
    for segment in segments:
        if not isinstance(segment, Slot):
            break
        n += segment.count
    return n if n and n == prompt_format.prompt_length else None


def adapter_config(num_virtual_tokens: int, token_dim: int, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT 0.21 writes it for PromptTuningConfig(task_type="CAUSAL_LM")."""
    return {
        "task_type": "CAUSAL_LM", "peft_type": "PROMPT_TUNING", "auto_mapping": None,
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
        "num_virtual_tokens": num_virtual_tokens, "token_dim": token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": None, "num_layers": None, "modules_to_save": None,
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }


def write_peft_dir(folder: Path, prompt_format: BasePromptFormat, rows: torch.Tensor,
                   config: dict[str, Any]) -> dict[str, int]:
    """Write a PEFT prompt-tuning adapter (and rugpt's prompt.json) for a format with leading prompt tokens;
    returns each written file's size."""
    from safetensors.torch import save

    from rugpt.atomic import atomic_write_bytes

    n = leading_prompt_length(prompt_format)
    if n is None:
        raise UsageError(f"format {prompt_format.template!r} cannot be a PEFT prompt-tuning adapter: PEFT puts all "
                         f"trained vectors before the input, so the format must start with its prompt tokens and "
                         f"have none after them (e.g. '<P*20>{{text}}')")
    folder = Path(folder)
    if folder.is_file():
        raise UsageError(f"cannot save a PEFT adapter to {str(folder)!r}: it is a file, give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows.detach().float().cpu().contiguous()
    files = {
        ADAPTER_WEIGHTS: save({PEFT_KEY: rows}, metadata={"format": "pt"}),
        ADAPTER_CONFIG: json.dumps(adapter_config(n, rows.shape[1], config.get("pretrained_model_name")),
                                   indent=2).encode("utf-8"),
        "prompt.json": json.dumps({"format": prompt_format.as_dict(), "config": config}, ensure_ascii=False,
                                  indent=1).encode("utf-8"),
    }
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return {name: (folder / name).stat().st_size for name in files}


def read_peft_dir(folder: Path) -> tuple[dict[str, Any], TensorPromptProvider]:
    """(prompt.json-like spec, provider) from a PEFT prompt-tuning or P-tuning adapter folder."""
    folder = Path(folder)
    config = _read_adapter_config(folder)
    rows = _read_adapter_rows(folder)
    n = int(config.get("num_virtual_tokens") or 0)
    if rows.shape[0] != n:
        raise DataError(f"{str(folder)!r}: {PEFT_KEY} has {rows.shape[0]} rows but adapter_config.json says "
                        f"num_virtual_tokens={n}")
    spec = _rugpt_spec(folder, n)
    if spec is None:
        spec = {"format": {"template": f"<P*{n}>{{text}}", "compiled_template": PROMPT_TOKEN * n + "{text}"},
                "config": {"embedding_dim": rows.shape[1], "prompt_length": n,
                           "pretrained_model_name": config.get("base_model_name_or_path")}}
    return spec, TensorPromptProvider.from_pretrained(rows)


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    from rugpt.prompts.compat import read_json

    path = folder / ADAPTER_CONFIG
    config = read_json(path)
    if not isinstance(config, dict):
        raise DataError(f"{str(path)!r} is not a PEFT adapter config: it holds no JSON object")
    kind, task = config.get("peft_type"), config.get("task_type")
    if kind not in _PROMPT_TYPES:
        raise UsageError(f"{str(path)!r} is a PEFT {kind} adapter; only prompt tuning (PROMPT_TUNING) and "
                         f"P-tuning (P_TUNING) adapters are prompts rugpt can load")
    if task not in (None, "CAUSAL_LM"):
        raise UsageError(f"{str(path)!r} is for task_type={task!r}; rugpt prompts are for CAUSAL_LM models")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise UsageError(f"{str(path)!r} has num_transformer_submodules={config['num_transformer_submodules']}; "
                         f"a decoder-only model takes one")
    return config


def _read_adapter_rows(folder: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rugpt.prompts.compat import read_tensor_file

    if (folder / ADAPTER_WEIGHTS).is_file():
        try:
            state = load_file(str(folder / ADAPTER_WEIGHTS))
        except (OSError, SafetensorError) as exc:
            raise DataError(f"cannot read {str(folder / ADAPTER_WEIGHTS)!r}: {exc}") from None
    elif (folder / ADAPTER_WEIGHTS_BIN).is_file():
        state = read_tensor_file(folder / ADAPTER_WEIGHTS_BIN)
    else:
        raise DataError(f"PEFT adapter folder {str(folder)!r} has no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    rows = state.get(PEFT_KEY) if isinstance(state, dict) else None
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
        raise DataError(f"the adapter in {str(folder)!r} holds no [tokens, hidden] {PEFT_KEY!r} tensor")
    return rows


def _rugpt_spec(folder: Path, n: int) -> dict[str, Any] | None:
    """The prompt.json rugpt wrote beside the adapter, when it describes these N leading tokens."""
    from rugpt.prompts.compat import read_prompt_json
    from rugpt.prompts.prompt_format import PromptFormat

    if not (folder / "prompt.json").is_file():
        return None
    spec = read_prompt_json(folder)
    fmt = spec["format"]
    if leading_prompt_length(PromptFormat(fmt["template"], fmt.get("compiled_template"))) != n:
        raise DataError(f"{str(folder / 'prompt.json')!r} describes a format other than the adapter's {n} leading "
                        f"prompt tokens")
    return spec
