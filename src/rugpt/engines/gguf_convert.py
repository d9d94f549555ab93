"""Convert a GPT-2-architecture checkpoint folder to GGUF for llama.cpp, with the model's own tokenizer and ids.

Any layout rugpt loads converts: safetensors or pickled `.bin` weights (read through rugpt.weights),
`tokenizer.json` or the slow `vocab.json` + `merges.txt`; the special ids are the ones rugpt resolved
against the vocabulary (rugpt.special_tokens), not whatever an old config names.

The layout follows llama.cpp's own `convert_hf_to_gguf.py` (`GPT2Model`, `_set_vocab_gpt2`): Conv1D
weights [in, out] are transposed to [out, in]; the attention masks (`attn.bias`) are dropped; the
vocabulary is the byte-level BPE token list with merges, `tokenizer.ggml.model = "gpt2"`. 1-D tensors
and the position embeddings stay f32 whatever the type, as there (they are read a row at a time).

Files land in a cache, `<cache>/gguf/<hash of the source files>-<type>/model.gguf`, written through a
temp folder and a rename, so a crash never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from rugpt.atomic import atomic_write_dir
from rugpt.cache import cache_dir
from rugpt.errors import UsageError
from rugpt.weights import file_sha256, weights_folder

log = logging.getLogger(__name__)

# Bump when the output for the same input changes, so older cached files are not reused.
CONVERTER_VERSION = "1"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GPT-2 graph uses the tanh GELU
BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                  "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_NAMES = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GGUFType(str, Enum):
    """Weight format of the 2-D tensors: f32 (exact), f16, or q8_0 (8-bit blocks of 32 with an f16 scale)."""

    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"


def unsupported_reason(config: dict) -> str | None:
    """Why llama.cpp's GPT-2 graph cannot run a checkpoint with this config.json (None when it can)."""
    if config.get("model_type") != "gpt2":
        return f"model type {config.get('model_type')!r} is not GPT-2"
    if config.get("activation_function", "gelu_new") not in TANH_GELUS:
        return f"activation {config.get('activation_function')!r} is not the tanh GELU"
    if (config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn")
            or not config.get("scale_attn_weights", True)):
        return "non-default attention scaling"
    if config.get("add_cross_attention"):
        return "cross-attention"
    return None


def source_hash(weights: Path, config: dict, tokenizer_spec: str, ids) -> str:
    """A content hash of everything the conversion reads, so an edited checkpoint is converted anew."""
    digest = hashlib.sha256(CONVERTER_VERSION.encode())
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(tokenizer_spec.encode())
    digest.update(repr(ids).encode())
    for path in sorted(weights.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def convert(folder: str | Path, gguf_type: GGUFType | str = GGUFType.f32, cache: Path | None = None,
            tokenizer=None) -> Path:
    """The GGUF file of checkpoint `folder` in `gguf_type`, converted on first use and reused afterwards.

    `tokenizer`: the loaded model's (its special ids already resolved); read from `folder` when not given.
    """
    from rugpt.models import load_tokenizer
    from rugpt.special_tokens import apply_special_ids, choose_special_ids

    folder, gguf_type = Path(folder), GGUFType(gguf_type)
    if not (folder / "config.json").is_file():
        raise UsageError(f"cannot convert {str(folder)!r} to GGUF: it lacks config.json")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    reason = unsupported_reason(config)
    if reason:
        raise UsageError(f"llama.cpp cannot run {str(folder)!r}: {reason}; use engine='transformers'")
    weights = weights_folder(folder)
    if tokenizer is None:
        from transformers import AutoConfig

        tokenizer = load_tokenizer(folder)
        ids = choose_special_ids(tokenizer, AutoConfig.from_pretrained(folder), config["vocab_size"], folder)
        apply_special_ids(ids, tokenizer)
    spec = tokenizer.backend_tokenizer.to_str()
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    target = (cache or cache_dir()) / "gguf" / f"{source_hash(weights, config, spec, ids)}-{gguf_type.value}"
    if (target / "model.gguf").is_file():
        return target / "model.gguf"
    log.info("converting %s to GGUF (%s) into %s", folder, gguf_type.value, target)
    with atomic_write_dir(target) as tmp:
        write_gguf(weights, folder.name, config, json.loads(spec), ids, gguf_type, tmp / "model.gguf")
        (tmp / "source.json").write_text(json.dumps({"source": str(folder.resolve()), "type": gguf_type.value,
                                                     "converter": CONVERTER_VERSION}), encoding="utf-8")
    return target / "model.gguf"


def write_gguf(weights: Path, name: str, config: dict, spec: dict, ids: tuple, gguf_type: GGUFType,
               path: Path) -> None:
    import gguf

    file_type = {GGUFType.f32: gguf.LlamaFileType.ALL_F32, GGUFType.f16: gguf.LlamaFileType.MOSTLY_F16,
                 GGUFType.q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer = gguf.GGUFWriter(path, arch="gpt2")
    n_embd = config["n_embd"]
    writer.add_name(name)
    writer.add_block_count(config["n_layer"])
    writer.add_context_length(config.get("n_positions") or config["n_ctx"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config.get("n_inner") or 4 * n_embd)
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(file_type)
    add_vocab(writer, spec, ids, config["vocab_size"])
    for tensor_name, tensor in read_tensors(weights, config):
        add_tensor(writer, tensor_name, tensor, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_name(name: str) -> str | None:
    """llama.cpp's name of a GPT-2 tensor (`transformer.h.3.mlp.c_fc.weight` → `blk.3.ffn_up.weight`);
    None for tensors llama.cpp does not use (the causal-mask buffers)."""
    name = name.removeprefix("transformer.")
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    if parts[0] != "h" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    module, kind = ".".join(parts[2:-1]), parts[-1]
    if module not in BLOCK_NAMES:
        raise UsageError(f"tensor {name!r} is not part of a GPT-2 block; cannot convert it to GGUF")
    return f"blk.{parts[1]}.{BLOCK_NAMES[module]}.{kind}"


def read_tensors(folder: Path, config: dict):
    """(GGUF name, float32 array in llama.cpp's [out, in] layout) for every tensor llama.cpp uses."""
    from safetensors import safe_open

    tied = config.get("tie_word_embeddings", True)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                target = gguf_name(name)
                if target is None or (target == "output.weight" and tied):
                    continue
                tensor = f.get_tensor(name).to(torch.float32)
                if name.endswith(CONV1D):
                    tensor = tensor.t()
                yield target, tensor.contiguous().numpy()


def add_tensor(writer, name: str, data: np.ndarray, gguf_type: GGUFType) -> None:
    import gguf

    if data.ndim <= 1 or name == "position_embd.weight" or gguf_type == GGUFType.f32:
        writer.add_tensor(name, data)
    elif gguf_type == GGUFType.f16 or data.shape[-1] % 32:  # q8_0 needs rows in blocks of 32, as upstream
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)


def add_vocab(writer, spec: dict, ids: tuple, vocab_size: int) -> None:
    """The byte-level BPE vocabulary padded to the model's vocab size, merges and special ids."""
    import gguf

    model = spec["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"the tokenizer is {model.get('type')!r}, not byte-level BPE; llama.cpp's GPT-2 needs BPE")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer ones)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    bos, eos, pad, unk = ids
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id),
                       (pad, writer.add_pad_token_id), (unk, writer.add_unk_token_id)):
        if value is not None and value < vocab_size:
            add(value)


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name: 'gpt-2' for GPT-2's own ByteLevel regex split, else its 'default'.

    Only llama.cpp's own tokenizer reads it; rugpt's engines get token ids from rugpt's tokenizer.
    """
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("pre-tokenizer %s is not GPT-2's; llama.cpp's own tokenizer may split text differently", pre)
    return "default"
