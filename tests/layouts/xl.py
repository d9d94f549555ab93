"""ruGPT-3 XL as the community conversion `evilfreelancer/ruGPT3XL` publishes it, in miniature.

Files and keys follow EvilFreelancer/rugpt3xl-convert (config.json, convert.py, tokenizer_config.json,
generation_config.json): fp16 `model.safetensors` with separate q/k/v and an untied head, 7 zero embedding
rows past the tokenizer, pad 0 / eos 1 `<|endoftext|>` / bos 2 `<s>` / unk 3, a config whose `auto_map`
points at the repo's own Python files, and those files, which here record that they ran and raise
SystemExit: rugpt must never import them. The weights are written by name from plain tensors, not by
rugpt's model class, so a wrong name in rugpt shows up as a load failure.
"""

from __future__ import annotations

from pathlib import Path

from layouts import build_tokenizer, write_json

XL_SPECIALS = ["<pad>", "<|endoftext|>", "<s>", "<unk>"]
PADDED_ROWS = 7  # 50257 tokens in 50264 rows in the real model
REMOTE_CODE_FILES = ("configuration_rugpt3xl.py", "modeling_rugpt3xl.py")
REMOTE_CODE_SENTINEL = "REMOTE_CODE_RAN"

# Small enough to run in milliseconds, sparse enough that the mask changes logits from the 9th token on:
# blocks of 4 tokens, local windows of 2 blocks, 1 global block per window, 2 head patterns.
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
        "max_position_embeddings": 128, "sparse_mode": "alternating", "sparse_block_size": 4,
        "sparse_num_local_blocks": 2, "sparse_num_global_blocks": 1, "sparse_num_different_global_patterns": 2}


def build_xl(folder: Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny XL checkpoint into `folder`; `overrides` change config keys (e.g. sparse_mode="none")."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder, XL_SPECIALS)
    config = _config(vocab + PADDED_ROWS, TINY | overrides)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "do_sample": True,
        "temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2, "max_new_tokens": 256,
        "transformers_version": "5.3.0"})
    write_json(folder / "special_tokens_map.json", {"pad_token": "<pad>", "eos_token": "<|endoftext|>",
                                                     "bos_token": "<s>", "unk_token": "<unk>"})
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "bos_token": "<s>",
        "eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 2048,
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": True})
    _write_weights(folder / "model.safetensors", config, vocab, seed)
    for name in REMOTE_CODE_FILES:
        (folder / name).write_text(_remote_code(folder), encoding="utf-8")
    return folder


def _config(vocab_rows: int, shape: dict) -> dict:
    return {
        "architectures": ["RuGPT3XLForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_rugpt3xl.RuGPT3XLConfig",
                     "AutoModel": "modeling_rugpt3xl.RuGPT3XLModel",
                     "AutoModelForCausalLM": "modeling_rugpt3xl.RuGPT3XLForCausalLM"},
        "model_type": "rugpt3xl", "vocab_size": vocab_rows, "hidden_act": "gelu_new", "initializer_range": 0.02,
        "layer_norm_eps": 1e-5, "embedding_dropout": 0.1, "attention_dropout": 0.1, "output_dropout": 0.1,
        "use_cache": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "5.3.0", **shape,
    }


def _write_weights(path: Path, config: dict, vocab: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    width, inner = config["hidden_size"], config["intermediate_size"]

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    # Wide weights (not the 0.02 of an initialiser): attention is peaked and greedy paths are well separated.
    state = {"model.embed_tokens.weight": normal(config["vocab_size"], width, std=1.0),
             "model.embed_positions.weight": normal(config["max_position_embeddings"], width, std=0.5),
             "model.norm.weight": normal(width, std=0.1, mean=1.0), "model.norm.bias": normal(width, std=0.1),
             "lm_head.weight": normal(config["vocab_size"], width, std=0.5)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}.{norm}.weight"] = normal(width, std=0.1, mean=1.0)
            state[f"{prefix}.{norm}.bias"] = normal(width, std=0.1)
        for proj, std in (("q_proj", 0.3), ("k_proj", 0.3), ("v_proj", 0.2), ("o_proj", 0.2)):
            state[f"{prefix}.self_attn.{proj}.weight"] = normal(width, width, std=std)
            state[f"{prefix}.self_attn.{proj}.bias"] = normal(width, std=0.05)
        state[f"{prefix}.mlp.up_proj.weight"] = normal(inner, width, std=0.2)
        state[f"{prefix}.mlp.up_proj.bias"] = normal(inner, std=0.05)
        state[f"{prefix}.mlp.down_proj.weight"] = normal(width, inner, std=0.1)
        state[f"{prefix}.mlp.down_proj.bias"] = normal(width, std=0.05)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name][vocab:] = 0.0  # Megatron's padding rows, zero in the published file
    save_file({name: tensor.half().contiguous() for name, tensor in state.items()}, str(path),
              metadata={"format": "pt"})


def _remote_code(folder: Path) -> str:
    # transformers would copy the file into its modules cache before importing it, so the sentinel's path is
    # absolute rather than next to __file__.
    sentinel = (folder / REMOTE_CODE_SENTINEL).resolve()
    return (f"# The published checkpoint ships its own model code; rugpt must never import it.\n"
            f"from pathlib import Path\n"
            f"Path({str(sentinel)!r}).write_text(__name__)\n"
            f"raise SystemExit('the ruGPT-3 XL fixture\\'s remote code was imported')\n")
