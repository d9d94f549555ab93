"""Prompts in ruPrompts' format (prompt.json + prompt_provider.bin, as konodyuk/prompt_rugpt3large_* are) load
unchanged and give the embeddings ruPrompts gives; prompts rugpt saves are in that format too.

The reference below is ruprompts 0.1.4's code path transcribed: LSTMPromptProvider.initialize/forward,
Prompt.save_pretrained (torch.save of the provider's output) and PromptEmbedding.forward.
"""

import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, GPT2LMHeadModel

from rugpt.errors import DataError
from rugpt.prompts import LSTMPromptProvider, Prompt, PromptFormat, TensorPromptProvider

LARGE = "sberbank-ai/rugpt3large_based_on_gpt2"


class ReferenceLSTMProvider(nn.Module):
    """ruprompts.prompt_provider.LSTMPromptProvider after initialize(): the same modules, made in its order."""

    def __init__(self, prompt_length, embedding_dim, hidden_dim, input_dim, num_lstm_layers=2):
        super().__init__()
        self.input = nn.Parameter(torch.rand(1, prompt_length, input_dim))
        self.lstm = nn.LSTM(input_size=input_dim, hidden_size=hidden_dim, num_layers=num_lstm_layers,
                            bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embedding_dim))

    def forward(self):
        return self.mlp(self.lstm(self.input)[0]).squeeze(0)


def reference_embeddings(embedding: nn.Embedding, rows: torch.Tensor, prompt_token_id: int, input_ids):
    """ruprompts.prompt_embedding.PromptEmbedding.forward."""
    batch_size = input_ids.shape[0]
    mask = input_ids == prompt_token_id
    input_ids = input_ids.clone()
    input_ids[mask] = 0
    out = embedding(input_ids)
    if mask.sum() == rows.shape[0] * batch_size:
        out[mask] = rows.repeat(batch_size, 1)
    return out


def write_ruprompts_folder(folder, rows, template, compiled, model=LARGE):
    """What ruprompts' Prompt.save_pretrained writes."""
    folder.mkdir(parents=True)
    config = {"embedding_dim": rows.shape[1], "prompt_length": rows.shape[0], "pretrained_model_name": model,
              "is_safe": False}
    (folder / "prompt.json").write_text(json.dumps({"format": {"template": template, "compiled_template": compiled},
                                                    "config": config}))
    torch.save(rows.detach().cpu(), folder / "prompt_provider.bin")
    return folder


@pytest.fixture
def model(tiny_model_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("kind", ["tensor", "lstm"])
def test_a_ruprompts_folder_gives_the_embeddings_ruprompts_gives(kind, model, tokenizer, tmp_path):
    torch.manual_seed(0)
    if kind == "lstm":
        rows = ReferenceLSTMProvider(6, 32, hidden_dim=16, input_dim=8)()
    else:
        rows = model.get_input_embeddings()(torch.randperm(model.config.vocab_size)[:6])
    folder = write_ruprompts_folder(tmp_path / kind, rows, "<P*4>{text}<P*2>", "<|P|>" * 4 + "{text}" + "<|P|>" * 2)
    table = model.get_input_embeddings()

    prompt = Prompt.from_pretrained(folder)
    assert prompt.is_initialized and not prompt.is_attached and prompt.config.pretrained_model_name == LARGE
    prompt.patch(model, tokenizer)
    texts = [prompt(text="Мороз и солнце"), prompt(text="Буря мглою небо кроет")]
    tokenizer.padding_side = "left"
    ids = tokenizer(texts, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        expected = reference_embeddings(table, rows.detach(), tokenizer.convert_tokens_to_ids("<|P|>"), ids)
        torch.testing.assert_close(model.get_input_embeddings()(ids), expected, rtol=0, atol=0)
    assert isinstance(prompt.provider, TensorPromptProvider)  # ruPrompts saved the rows, so rows come back
    prompt.provider().sum().backward()  # and train further
    assert prompt.provider.weights.grad is not None


def test_a_published_prompt_loads_by_hub_id_from_the_cache(monkeypatch, tmp_path, model, tokenizer):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rows = torch.randn(5, 32)
    snapshot = tmp_path / "hub" / "models--konodyuk--prompt_rugpt3large_joke" / "snapshots" / ("a" * 40)
    write_ruprompts_folder(snapshot, rows, "<P*5>", "<|P|>" * 5)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    prompt = Prompt.from_pretrained("konodyuk/prompt_rugpt3large_joke").patch(model, tokenizer)
    assert prompt() == "<|P|>" * 5
    torch.testing.assert_close(prompt.provider.weights.detach(), rows)


def test_a_bin_in_torchs_legacy_format_loads(tmp_path):
    folder = write_ruprompts_folder(tmp_path / "old", torch.randn(2, 8), "<P*2>{text}", "<|P|><|P|>{text}")
    rows = torch.randn(2, 8)
    torch.save(rows, folder / "prompt_provider.bin", _use_new_zipfile_serialization=False)
    torch.testing.assert_close(Prompt.from_pretrained(folder).provider.weights.detach(), rows)


def test_a_bin_with_pickled_objects_is_refused_unread(tmp_path):
    folder = write_ruprompts_folder(tmp_path / "evil", torch.zeros(2, 8), "<P*2>", "<|P|><|P|>")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"rows": torch.zeros(2, 8), "payload": Payload()}, folder / "prompt_provider.bin")
    with pytest.raises(DataError, match="refused .*objects other than tensors.*weights-only loader"):
        Prompt.from_pretrained(folder)
    torch.save({"rows": torch.zeros(2, 8)}, folder / "prompt_provider.bin")
    with pytest.raises(DataError, match="not the \\[tokens, hidden\\] float tensor"):
        Prompt.from_pretrained(folder)


@pytest.mark.parametrize("provider", ["tensor", "lstm"])
def test_what_rugpt_saves_is_what_ruprompts_reads(provider, model, tokenizer, tmp_path):
    made = TensorPromptProvider() if provider == "tensor" else LSTMPromptProvider(hidden_dim=8)
    prompt = Prompt(format=PromptFormat("<P*3>{text}"), provider=made)
    prompt.patch(model, tokenizer)
    prompt.save_pretrained(tmp_path / "p")
    spec = json.loads((tmp_path / "p" / "prompt.json").read_text())
    # ruPrompts builds PromptFormat(**spec["format"]) and PromptConfig(**spec["config"]): only keys it knows
    assert set(spec["format"]) == {"template", "compiled_template"}
    assert set(spec["config"]) == {"embedding_dim", "prompt_length", "pretrained_model_name", "is_safe"}
    rows = torch.load(tmp_path / "p" / "prompt_provider.bin", weights_only=True)
    torch.testing.assert_close(rows, prompt.provider().detach())
