"""Registry of known checkpoints (the ruGPT-3 family and the bundled model); resolve a name and load it.

A name is an alias (`tiny`, `small`, `medium`, `large`, ...), a Hugging Face hub id or a local folder.
Weights are read only from safetensors files and remote code is never trusted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rugpt.errors import ModelNotFound, UsageError

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "tiny"


@dataclass(frozen=True)
class ModelSpec:
    """One known checkpoint: where it lives and what it is."""

    alias: str
    hub_id: str
    shape: str
    params: str
    context: int
    notes: str = ""
    plain_transformers: bool = True


REGISTRY: tuple[ModelSpec, ...] = (
    ModelSpec("tiny", "bundled", "6 × 256 × 4", "6.9M", 512,
              "the project's own model, trained on Russian classics; ships with the package, works offline"),
    ModelSpec("small", "ai-forever/rugpt3small_based_on_gpt2", "12 × 768 × 12", "125M", 2048,
              "trained on 80B tokens, at 1024 then 2048 context"),
    ModelSpec("medium", "ai-forever/rugpt3medium_based_on_gpt2", "24 × 1024 × 16", "355M", 2048,
              "reported test perplexity 17.4"),
    ModelSpec("large", "ai-forever/rugpt3large_based_on_gpt2", "24 × 1536 × 16", "760M", 2048,
              "reported perplexity 13.6; the model of the ruPrompts prompts and recommender examples"),
    ModelSpec("xl", "ai-forever/rugpt3xl", "24 × 2048 × 16", "1.3B", 2048,
              "needs DeepSpeed sparse attention (alternating 'fixed' layout), triton and apex; "
              "not loadable with plain transformers", plain_transformers=False),
    ModelSpec("gpt2-large", "ai-forever/rugpt2large", "36 × 1280 × 20", "774M", 1024, "ruGPT-2 Large"),
    ModelSpec("13b", "ai-forever/ruGPT-3.5-13B", "—", "13B", 2048,
              "a later, separate release; about 26 GB in fp16, needs a large GPU"),
)
_BY_ALIAS = {spec.alias: spec for spec in REGISTRY} | {"bundled": REGISTRY[0]}
# Hub ids once lived under sberbank-ai/; they redirect to ai-forever/.
_BY_HUB_ID = {spec.hub_id.lower(): spec for spec in REGISTRY} | {
    spec.hub_id.lower().replace("ai-forever/", "sberbank-ai/"): spec for spec in REGISTRY
}


@dataclass
class LoadedModel:
    """A model ready to use: the torch module, its tokenizer and where they came from."""

    model: object
    tokenizer: object
    name: str
    source: str
    device: str

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def find_spec(name: str) -> ModelSpec | None:
    """The registry entry for an alias or a known hub id (old sberbank-ai/ ids too), else None."""
    return _BY_ALIAS.get(name.lower()) or _BY_HUB_ID.get(name.lower())


def resolve(name: str | None) -> str:
    """Where to load `name` from: the bundled folder, a local folder, or a hub id."""
    name = name or DEFAULT_MODEL
    spec = find_spec(name)
    if spec is not None:
        if not spec.plain_transformers:
            raise UsageError(
                f"model {name!r} ({spec.hub_id}) {spec.notes}; use 'large' or another GPT-2-architecture checkpoint"
            )
        return str(BUNDLED_DIR) if spec.hub_id == "bundled" else spec.hub_id
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelNotFound(f"model folder {name!r} does not exist")
    if "/" not in name:
        known = ", ".join(sorted(_BY_ALIAS))
        raise ModelNotFound(f"unknown model {name!r}: use one of {known}, a hub id such as "
                            f"'ai-forever/rugpt3small_based_on_gpt2', or a local folder")
    return name


def local_copy(spec: ModelSpec) -> str | None:
    """Where a registry entry is available on this machine (bundled, HF cache), or None."""
    if spec.hub_id == "bundled":
        return str(BUNDLED_DIR) if (BUNDLED_DIR / "model.safetensors").exists() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, "config.json")
    return str(Path(cached).parent) if isinstance(cached, str) else None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str | None, device: str):
    """fp32 on CPU (fastest here for the reference path), bf16 on GPUs that support it, else fp16."""
    import torch

    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is None:
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in allowed:
        raise UsageError(f"dtype={dtype!r} is not supported; use one of {', '.join(allowed)}")
    return allowed[dtype]


def load(name_or_path: str | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer by alias, hub id or folder; the bundled model when no name is given.

    Offline with no cached copy, raises ModelNotFound with one sentence saying how to get it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name = name_or_path or DEFAULT_MODEL
    source = resolve(name)
    device = device or default_device()
    torch_dtype = pick_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        # security: safetensors only, never a pickle; never code from the checkpoint.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFound(_not_found_message(name, source, exc)) from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s from %s on %s (%s)", name, source, device, torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, device=device)


def _not_found_message(name: str, source: str, exc: Exception) -> str:
    text = str(exc)
    if Path(source) == BUNDLED_DIR:
        return (f"the bundled model's weights are missing from {source}; reinstall rugpt, "
                f"or rebuild them with `rugpt train-tokenizer` and `rugpt pretrain` (see the README)")
    if Path(source).is_dir():
        if "safetensors" in text or not any(Path(source).glob("*.safetensors")):
            return (f"model folder {source!r} has no safetensors weights; rugpt never loads pickled weights — "
                    f"convert it once with transformers: from_pretrained(...).save_pretrained(folder)")
        return f"model folder {source!r} cannot be loaded: {text.splitlines()[0]}"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    where = "this machine is offline (HF_HUB_OFFLINE=1)" if offline else "the hub has no such model or is unreachable"
    return (f"model {name!r} ({source}) is not in the Hugging Face cache and {where}; "
            f"download it on a connected machine with `hf download {source}` or pass a local folder")


def list_models() -> list[dict]:
    """The registry with where each model is available locally."""
    rows = []
    for spec in REGISTRY:
        where = local_copy(spec) if spec.plain_transformers else None
        rows.append({
            "alias": spec.alias, "hub_id": spec.hub_id, "shape": spec.shape, "params": spec.params,
            "context": spec.context, "notes": spec.notes,
            "available": ("bundled" if spec.hub_id == "bundled" else "HF cache") if where else "no",
            "path": where,
        })
    return rows
