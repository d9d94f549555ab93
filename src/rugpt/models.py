"""Registry of known checkpoints (the ruGPT-3 family and the bundled model); resolve a name and load it.

A name is an alias (`tiny`, `small`, `medium`, `large`, ...), a Hugging Face hub id or a local folder.
Weights are mapped from safetensors files (pickled `.bin` files are converted once through torch's
weights-only loader, see rugpt.weights) and remote code is never trusted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rugpt.errors import ModelNotFound, UsageError, first_line

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "tiny"


@dataclass(frozen=True)
class PublishedIds:
    """Token ids of padding, start and end of text, as the checkpoint's own config publishes them."""

    pad: int
    bos: int
    eos: int


@dataclass(frozen=True)
class ModelSpec:
    """One known checkpoint: where it lives and what it is."""

    alias: str
    hub_id: str
    shape: str
    params: str
    context: int
    notes: str = ""
    # What `rugpt download` fetches, from the hub's published file sizes (None: ships with rugpt).
    download_gb: float | None = None
    # None: read from the checkpoint's own tokenizer (the bundled model, which has no hub page).
    special_ids: PublishedIds | None = None


# The ids the ruGPT-3 configs publish since December 2023 (older copies say 50256, a token not in the vocabulary).
_RUGPT3_IDS = PublishedIds(pad=0, bos=1, eos=2)

REGISTRY: tuple[ModelSpec, ...] = (
    ModelSpec("tiny", "bundled", "6 × 256 × 4", "6.9M", 512,
              "the project's own model, trained on Russian classics; ships with the package, works offline"),
    ModelSpec("small", "ai-forever/rugpt3small_based_on_gpt2", "12 × 768 × 12", "125M", 2048,
              "trained on 80B tokens, at 1024 then 2048 context", download_gb=0.55, special_ids=_RUGPT3_IDS),
    ModelSpec("medium", "ai-forever/rugpt3medium_based_on_gpt2", "24 × 1024 × 16", "355M", 2048,
              "reported test perplexity 17.4", download_gb=1.73, special_ids=_RUGPT3_IDS),
    ModelSpec("large", "ai-forever/rugpt3large_based_on_gpt2", "24 × 1536 × 16", "760M", 2048,
              "reported perplexity 13.6; the model of the ruPrompts prompts and recommender examples",
              download_gb=3.14, special_ids=_RUGPT3_IDS),
    # ai-forever/rugpt3xl holds only the Megatron checkpoint; this community conversion has the transformers layout.
    ModelSpec("xl", "evilfreelancer/ruGPT3XL", "24 × 2048 × 16", "1.3B", 2048,
              "community conversion (fp16 safetensors) of ai-forever/rugpt3xl; alternating sparse attention, "
              "run by rugpt's own architecture, never the repo's code; reported perplexity 12.05",
              download_gb=2.6, special_ids=PublishedIds(pad=0, bos=2, eos=1)),
    ModelSpec("gpt2-large", "ai-forever/rugpt2large", "36 × 1280 × 20", "774M", 1024, "ruGPT-2 Large",
              download_gb=3.39, special_ids=_RUGPT3_IDS),
    ModelSpec("13b", "ai-forever/ruGPT-3.5-13B", "40 × 5120 × 40", "13B", 2048,
              "ruGPT-3.5, a later, separate release; six float32 shards, loaded shard by shard; "
              "about 26 GB in fp16, about 14 GB in int8",
              download_gb=59.0, special_ids=PublishedIds(pad=0, bos=2, eos=3)),
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
    sampleable_vocab: int | None = None  # ids past it (padded embedding rows) are never generated
    folder: Path | None = None  # the checkpoint's files on disk (a hub id's snapshot in the HF cache)

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
    if name.lower().removeprefix("sberbank-ai/").removeprefix("ai-forever/") == "rugpt3xl" and "/" in name:
        raise UsageError(f"{name!r} holds only ruGPT-3 XL's Megatron checkpoint, which needs DeepSpeed; use 'xl' "
                         f"({_BY_ALIAS['xl'].hub_id}, its transformers conversion, which rugpt runs itself)")
    if spec is not None:
        return str(BUNDLED_DIR) if spec.hub_id == "bundled" else spec.hub_id
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"model {name!r} is a file; give a checkpoint folder, a hub id or a .gguf file")
        return str(path)
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
    """Load a model and its tokenizer by alias, hub id, folder or `.gguf` file; the bundled model when no name.

    `.bin` weights are read once through torch's weights-only loader and kept as safetensors in rugpt's
    cache (rugpt.weights); sharded checkpoints load shard by shard, cast to `dtype` as they arrive.
    Offline with no cached copy, raises ModelNotFound with one sentence saying how to get it.
    """
    name = name_or_path or DEFAULT_MODEL
    source = resolve(name)
    device = device or default_device()
    if source.endswith(".gguf"):
        from rugpt.gguf_checkpoint import load_gguf

        return load_gguf(Path(source), name, device, dtype)
    folder = checkpoint_folder(name, source)
    from rugpt.architectures import register

    register()  # before the tokenizer: AutoTokenizer reads the config, whose model type may be rugpt's own
    tokenizer = load_tokenizer(folder)
    model = _load_weights(name, folder, device, pick_dtype(dtype, device))
    from rugpt.special_tokens import resolve_special_ids

    special = resolve_special_ids(tokenizer, model, folder)
    log.info("loaded %s from %s on %s (%s)", name, source, device, model.dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, device=device,
                       sampleable_vocab=special.sampleable, folder=folder)


def checkpoint_folder(name: str, source: str) -> Path:
    """The local folder of `source`: a folder as is, a hub id from the HF cache (downloaded first when online)."""
    if Path(source).is_dir():
        return Path(source)
    from rugpt.download import download

    return download(source)


def load_tokenizer(folder: Path):
    """The model's own tokenizer: `tokenizer.json` when there is one, else the slow GPT2Tokenizer files."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        # A model type transformers does not know (ruGPT-3 XL's converted layout) still has GPT-2 files.
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return GPT2Tokenizer.from_pretrained(folder)
        raise ModelNotFound(f"model folder {str(folder)!r} has no tokenizer rugpt can read "
                            f"(tokenizer.json, or vocab.json + merges.txt): {first_line(exc)}") from None


def _load_weights(name: str, folder: Path, device: str, torch_dtype):
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from rugpt.weights import weights_folder

    hf_logging.disable_progress_bar()
    if folder == BUNDLED_DIR and not (folder / "model.safetensors").exists():
        raise ModelNotFound(f"the bundled model's weights are missing from {folder}; reinstall rugpt, "
                            f"or rebuild them with `rugpt train-tokenizer` and `rugpt pretrain` (see the README)")
    weights = weights_folder(folder)
    try:
        # security: safetensors only (pickles are converted through the weights-only loader first);
        # never code from the checkpoint, even when its config carries an auto_map.
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model, missing = _read_weights(weights, config, torch_dtype, _generation_config(folder, config))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFound(f"{_label(name, folder)} cannot be loaded: {first_line(exc)}") from None
    model.name_or_path = model.config._name_or_path = str(folder)  # not the cache folder the weights came from
    # A remote-code pointer (XL's converted layout) would be saved into every fine-tune, naming files it lacks.
    if getattr(model.config, "auto_map", None):
        del model.config.auto_map
    # transformers fills missing tensors with random values and only logs it: a broken checkpoint must not run.
    if missing:
        missing = sorted(missing)
        raise ModelNotFound(f"{_label(name, folder)} lacks weights: {', '.join(missing[:3])}"
                            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return model.to(device).eval()


def _read_weights(weights: Path, config, torch_dtype, generation_config):
    """(model, names of missing tensors). Weights stored in the wanted dtype are mapped from their files by
    transformers (no copy); others are cast one file at a time (rugpt.weights.load_cast), so a float32
    checkpoint loaded in bf16 or fp16 never holds a float32 copy."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from rugpt.weights import load_cast, stored_dtype

    if getattr(torch, stored_dtype(weights)) == torch_dtype:
        model, info = AutoModelForCausalLM.from_pretrained(
            weights, config=config, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False,
            generation_config=generation_config, output_loading_info=True)
        return model, info.get("missing_keys", [])
    with no_init_weights():  # every tensor is overwritten from the files; random init would only cost time
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=False)
    model.tie_weights()  # skipped with the init above; a tied head is then filled with the embeddings
    model.generation_config = generation_config
    return model, load_cast(model, weights, torch_dtype)


def _generation_config(folder: Path, config):
    """The folder's generation_config.json, else one made from the model config (the weights may sit elsewhere)."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)


def _label(name: str, folder: Path) -> str:
    return f"model folder {str(folder)!r}" if Path(name).expanduser() == folder else f"model {name!r} ({folder})"


def _bundled_special_ids() -> PublishedIds | None:
    """The bundled tokenizer's pad/bos/eos ids, read from its files (the tokenizers library, no transformers)."""
    import json

    from tokenizers import Tokenizer

    try:
        names = json.loads((BUNDLED_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
        vocab = Tokenizer.from_file(str(BUNDLED_DIR / "tokenizer.json"))
    except Exception:  # tokenizers raises a bare Exception on a missing or bad file
        return None  # listing the registry must not fail because the package lost a file
    ids = {role: vocab.token_to_id(names.get(f"{role}_token") or "") for role in ("pad", "bos", "eos")}
    return None if None in ids.values() else PublishedIds(**ids)


def list_models() -> list[dict]:
    """The registry with its published download sizes, special-token ids and where each model is cached."""
    rows = []
    for spec in REGISTRY:
        where = local_copy(spec)
        ids = spec.special_ids or (_bundled_special_ids() if spec.hub_id == "bundled" else None)
        rows.append({
            "alias": spec.alias, "hub_id": spec.hub_id, "shape": spec.shape, "params": spec.params,
            "context": spec.context, "notes": spec.notes,
            "download_gb": spec.download_gb,
            "special_ids": dict(vars(ids)) if ids else None,
            "available": ("bundled" if spec.hub_id == "bundled" else "HF cache") if where else "no",
            "path": where,
        })
    return rows
