"""Tiny checkpoints in the exact layouts the ruGPT-3 family is published in (../shared/MODELS.md).

Each builder writes a folder (or file) that a real download would give, in miniature: the same file
names, the same pickled or safetensors weights, the slow GPT2Tokenizer files (`vocab.json` +
`merges.txt`, no `tokenizer.json`), the same special tokens and ids, padded embedding rows, shards.
Weights are random (std widened so that greedy paths differ); the tokenizer is a byte-level BPE
trained here on a few public-domain lines, so Russian text splits into real multi-character tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

# Pushkin, Lermontov, Tyutchev: public domain; enough text for a few hundred merges.
RUSSIAN_TEXT = """\
Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный — пора, красавица, проснись:
открой сомкнуты негой взоры навстречу северной Авроры, звездою севера явись!
Вечор, ты помнишь, вьюга злилась, на мутном небе мгла носилась; луна, как бледное пятно,
сквозь тучи мрачные желтела, и ты печальная сидела — а нынче... погляди в окно:
под голубыми небесами великолепными коврами, блестя на солнце, снег лежит.
Я помню чудное мгновенье: передо мной явилась ты, как мимолётное виденье, как гений чистой красоты.
Белеет парус одинокий в тумане моря голубом!.. Что ищет он в стране далёкой? Что кинул он в краю родном?
Люблю грозу в начале мая, когда весенний, первый гром, как бы резвяся и играя, грохочет в небе голубом.
Вопрос: Какая столица у России? Ответ: Москва. Вопрос: Сколько дней в неделе? Ответ: 7.
Привет! Как дела? Всё хорошо, спасибо. Жил-был старик со своею старухой у самого синего моря.
"""


def build_tokenizer(folder: Path, specials: list[str], vocab_size: int = 400) -> int:
    """Write a byte-level BPE as `vocab.json` + `merges.txt` with `specials` at ids 0..k-1; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(RUSSIAN_TEXT.splitlines() * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(folder))
    return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")


RUGPT3_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
RUGPT35_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def gpt2_layout(folder: Path, *, specials: list[str], special_map: dict, ids: dict, padded_rows: int,
                shards: int = 1, seed: int = 0, n_embd: int = 32, n_layer: int = 2, extra_config: dict | None = None,
                tokenizer_config: dict | None = None) -> Path:
    """A GPT2LMHeadModel checkpoint as ruGPT-3 publishes it: pickled `.bin` weights (tied head stored twice,
    as transformers 4 saved it, plus the old `attn.bias` mask buffers), slow tokenizer files, padded rows.

    The padded rows get large weights on purpose: a sampler that let them through would pick them.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder, specials)
    write_json(folder / "special_tokens_map.json", special_map)
    if tokenizer_config is not None:
        write_json(folder / "tokenizer_config.json", tokenizer_config)
    config = GPT2Config(vocab_size=vocab + padded_rows, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        **ids, **(extra_config or {}))
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)
        model.transformer.wte.weight[vocab:] = 8.0
    config.save_pretrained(folder)
    state = dict(model.state_dict())
    state["lm_head.weight"] = model.transformer.wte.weight  # the same storage, as torch.save keeps it
    for layer in range(n_layer):
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    _save_bin(folder, state, shards)
    return folder


def _save_bin(folder: Path, state: dict, shards: int) -> None:
    import torch

    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    sizes = {n: t.numel() * t.element_size() for n, t in state.items()}
    total, parts, filled = sum(sizes.values()), [[] for _ in range(shards)], 0
    for name in state:  # in order, each shard about total / shards bytes, as transformers' max_shard_size does
        parts[min(shards - 1, filled * shards // total)].append(name)
        filled += sizes[name]
    weight_map = {}
    for index, part in enumerate(parts):
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map |= dict.fromkeys(part, file)
    write_json(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def build_small_2023(folder: Path, seed: int = 0) -> Path:
    """ai-forever/rugpt3small_based_on_gpt2 (and medium) since December 2023: pad 0, bos 1, eos 2, 7 padded rows."""
    gpt2_layout(folder, specials=RUGPT3_SPECIALS, seed=seed, padded_rows=7,
                special_map={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                             "mask_token": "<mask>"},
                ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    (folder / "flax_model.msgpack").write_bytes(b"\x80flax weights rugpt must never download or read")
    return folder


def build_large(folder: Path, seed: int = 0) -> Path:
    """ai-forever/rugpt3large_based_on_gpt2: the 2023 ids, and as many embedding rows as tokens."""
    gpt2_layout(folder, specials=RUGPT3_SPECIALS, seed=seed, padded_rows=0,
                special_map={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                             "mask_token": "<mask>"},
                ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    return folder


def build_old_finetune(folder: Path, seed: int = 0) -> Path:
    """A hub fine-tune made from a pre-2023 config: eos/bos name GPT-2's `<|endoftext|>`/50256, which ruGPT's
    vocabulary lacks (here: the last ordinary token's id, as 50256 is in the real vocabulary)."""
    vocab_probe = build_tokenizer(folder, RUGPT3_SPECIALS)
    gpt2_layout(folder, specials=RUGPT3_SPECIALS, seed=seed, padded_rows=7,
                special_map={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                             "unk_token": "<|endoftext|>"},
                ids={"bos_token_id": vocab_probe - 1, "eos_token_id": vocab_probe - 1})
    return folder


def build_13b_sharded(folder: Path, seed: int = 0, shards: int = 3, n_embd: int = 32, n_layer: int = 2) -> Path:
    """ai-forever/ruGPT-3.5-13B: float32 `.bin` shards with an index, pad 0, bos 2, eos 3, rows padded to a
    multiple of 16 (50272 for 50257 tokens), gelu_new; its card tokenizes without special tokens."""
    vocab = build_tokenizer(folder, RUGPT35_SPECIALS)
    gpt2_layout(folder, specials=RUGPT35_SPECIALS, seed=seed, padded_rows=(-vocab) % 16 or 16, shards=shards,
                n_embd=n_embd, n_layer=n_layer,
                special_map={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                ids={"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
                extra_config={"activation_function": "gelu_new", "n_inner": None},
                tokenizer_config={"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False,
                                  "model_max_length": 2048})
    return folder
