"""GGUF files as models: llama.cpp runs the file as it is; tokenizer and special ids come from its metadata.

Why: ruGPT-3.5-13B circulates as community GGUF files (`oblivious/ruGPT-3.5-13B-GGUF`, GGUF
architecture gpt2, Q2_K … Q8_0) that llama.cpp runs in a fraction of the float checkpoint's memory.
Generating needs only the file and its tokenizer, so loading reads the metadata and nothing else.
Scoring, fine-tuning and the torch engines need a torch module: it is dequantized from the file the
first time something reads `.model` (ruGPT-3.5-13B in float32 is 52 GB, so never for generation alone).

The metadata is read with transformers' own GGUF reader, which needs no `gguf` package; only the
dequantization (and llama.cpp) need the optional extra `rugpt[llamacpp]`.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from rugpt.errors import ModelNotFound, UsageError
from rugpt.models import LoadedModel, default_device, pick_dtype

log = logging.getLogger(__name__)

ARCHITECTURE = "gpt2"  # the GGUF architecture llama.cpp's converter gives GPT-2 checkpoints, ruGPT-3.5 included
_MAGIC = b"GGUF"
# gguf.TokenType values (kept here so that reading a file needs no gguf package)
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5  # UNUSED: the [PAD…] rows past the tokenizer's vocabulary
_INSTALL_HINT = "dequantizing a GGUF file into a torch model needs the gguf package: pip install 'rugpt[llamacpp]'"


class GGUFModel(LoadedModel):
    """A model loaded from a GGUF file: `gguf_path` for llama.cpp, `.model` dequantized on first use."""

    def __init__(self, gguf_path: Path, metadata: dict, shapes: dict[str, tuple[int, ...]], tokenizer, name: str,
                 device: str, dtype: str | None):
        self.gguf_path = gguf_path
        self.metadata = metadata
        self._shapes = shapes  # tensor name → shape in torch order, for the config of the torch model
        self._dtype = dtype
        self._model = None
        super().__init__(model=None, tokenizer=tokenizer, name=name, source=str(gguf_path), device=device,
                         sampleable_vocab=sampleable_vocab(metadata))

    @property
    def model(self):
        """The torch module, dequantized from the file on first use (slow and memory-hungry for large files)."""
        if self._model is None:
            self._model = dequantized_model(self)
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def model_built(self) -> bool:
        """Whether the torch module exists yet; engines that run the file itself leave it unbuilt."""
        return self._model is not None

    @property
    def context_length(self) -> int:
        return int(self.metadata[f"{ARCHITECTURE}.context_length"])

    @property
    def weight_type(self) -> str | None:
        """The file's quantization as llama.cpp names it, lower-case ('q8_0', 'q4_k_m', 'f16'); None if unstated."""
        code = self.metadata.get("general.file_type")
        if code is None:
            return None
        try:
            import gguf

            return gguf.LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        except (ImportError, ValueError):  # no gguf package, or a type newer than it
            return f"type {code}"

    # The dataclass versions of these read every field, `.model` included, which would dequantize the file.
    def __repr__(self) -> str:
        return f"GGUFModel(name={self.name!r}, gguf_path={str(self.gguf_path)!r}, device={self.device!r})"

    def __eq__(self, other) -> bool:
        return self is other

    __hash__ = object.__hash__


def load_gguf(path: Path, name: str, device: str | None = None, dtype: str | None = None) -> GGUFModel:
    """Load a GGUF file's tokenizer and metadata; the torch model waits until `.model` is read.

    Raises ModelNotFound (missing, not GGUF, truncated or damaged file) or UsageError (not GPT-2),
    each one sentence naming the file.
    """
    path = Path(path).expanduser()
    metadata, shapes = read_gguf(path)
    architecture = metadata["general.architecture"]
    if architecture != ARCHITECTURE:
        raise UsageError(f"GGUF file {str(path)!r} holds a {architecture!r} model; rugpt runs GPT-2-architecture "
                         f"files (GGUF architecture {ARCHITECTURE!r}), such as the ruGPT-3.5-13B conversions")
    if f"{ARCHITECTURE}.context_length" not in metadata or "token_embd.weight" not in shapes:
        raise ModelNotFound(f"GGUF file {str(path)!r} lacks {ARCHITECTURE}.context_length or token_embd.weight; "
                            f"it is not a complete GPT-2 conversion")
    tokenizer = tokenizer_from_gguf(path, metadata)
    device = device or default_device()
    pick_dtype(dtype, device)  # a bad dtype fails now, not at the first `.model` minutes later
    log.info("loaded %s from GGUF %s (tokenizer and metadata; the file stays on disk for llama.cpp)", name, path)
    return GGUFModel(path, metadata, shapes, tokenizer, name, device, dtype)


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The file's metadata and tensor shapes, after checking it is a GGUF whose tensors all fit in it."""
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    if not path.is_file():
        raise ModelNotFound(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelNotFound(f"{str(path)!r} is not a GGUF file: it does not start with the bytes 'GGUF'")
    try:
        metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
        header = GgufHeader.from_file(str(path))
    # A cut-off or garbled header fails somewhere inside the parser, with any of these.
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError, struct.error):
        raise ModelNotFound(f"GGUF file {str(path)!r} cannot be read: its header is damaged or cut off "
                            f"(an interrupted download?); download it again") from None
    size = path.stat().st_size
    needed = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=0)
    if needed > size:
        raise ModelNotFound(f"GGUF file {str(path)!r} is truncated: its tensors need {needed} bytes but it has "
                            f"{size} (an interrupted download?); download it again")
    return metadata, {t.name: t.shape for t in header.tensors}


def tokenizer_from_gguf(path: Path, metadata: dict):
    """The byte-level BPE the file describes (`tokenizer.ggml.*`), with its own bos / eos / unk / pad ids.

    Built here with the tokenizers library rather than by `AutoTokenizer.from_pretrained(folder,
    gguf_file=...)`: transformers' GPT2Tokenizer adds `<|endoftext|>` as a new token when the vocabulary
    lacks it, as ruGPT's does, so ids would run past the model's rows; it would also read any
    `tokenizer_config.json` lying next to the file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2" or not isinstance(tokens, list) or not isinstance(merges, list):
        raise UsageError(f"GGUF file {str(path)!r} has a {kind!r} tokenizer; rugpt needs GPT-2's byte-level BPE "
                         f"(tokenizer.ggml.model 'gpt2' with tokens and merges)")
    bpe = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                               merges=[tuple(merge.split(" ")) for merge in merges], fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, as ruGPT was trained
    bpe.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or []
    # Control tokens (<s>, <|endoftext|>) and user-defined ones stay whole wherever they appear in a text.
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=False) if k == _CONTROL])
    bpe.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED])
    special = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if index is not None and 0 <= index < len(tokens):
            special[f"{role}_token"] = tokens[index]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as models.load does: batching needs some pad id
    return tokenizer


def sampleable_vocab(metadata: dict) -> int | None:
    """Ids below the padded rows at the end of the vocabulary, which converters mark UNUSED; None if none."""
    types = metadata.get("tokenizer.ggml.token_type")
    if not isinstance(types, list):
        return None
    padded = 0
    while padded < len(types) and types[-1 - padded] == _UNUSED:
        padded += 1
    return len(types) - padded if padded else None


def gpt2_config(loaded: GGUFModel):
    """The transformers GPT2Config of the file, from its metadata and tensor shapes.

    Passed to `from_pretrained` explicitly: transformers' own GGUF mapping for gpt2 sends
    `context_length` to `n_ctx`, which GPT2Config ignores, so a 2048-context file would get
    1024 position rows and fail to load.
    """
    from transformers import GPT2Config

    meta, tokenizer = loaded.metadata, loaded.tokenizer
    n_embd = int(meta[f"{ARCHITECTURE}.embedding_length"])
    return GPT2Config(
        vocab_size=loaded._shapes["token_embd.weight"][0],
        n_positions=loaded.context_length,
        n_embd=n_embd,
        n_layer=int(meta[f"{ARCHITECTURE}.block_count"]),
        n_head=int(meta[f"{ARCHITECTURE}.attention.head_count"]),
        n_inner=int(meta.get(f"{ARCHITECTURE}.feed_forward_length", 4 * n_embd)),
        layer_norm_epsilon=float(meta.get(f"{ARCHITECTURE}.attention.layer_norm_epsilon", 1e-5)),
        activation_function="gelu_new",  # llama.cpp's GPT-2 graph computes the tanh GELU
        tie_word_embeddings="output.weight" not in loaded._shapes,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def dequantized_model(loaded: GGUFModel):
    """A GPT2LMHeadModel with the file's weights dequantized by transformers, on the loaded device and dtype."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise UsageError(_INSTALL_HINT)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' dequantizing bar would clutter the CLI's stderr
    torch_dtype = pick_dtype(loaded._dtype, loaded.device)
    log.info("dequantizing %s into a %s torch model (scoring, fine-tuning and the torch engines need one)",
             loaded.gguf_path, torch_dtype)
    path = loaded.gguf_path
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), config=gpt2_config(loaded),
                                                 dtype=torch_dtype)
    # Dequantized, the weights are plain tensors: forget the GGUF "quantizer", which would refuse
    # save_pretrained (a fine-tune of a GGUF model saves an ordinary safetensors checkpoint).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(loaded.device).eval()

