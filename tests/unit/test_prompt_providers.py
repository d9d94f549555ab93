import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from rugpt.errors import UsageError
from rugpt.models import BUNDLED_DIR
from rugpt.prompts.prompt_provider import (
    LSTMPromptProvider,
    MLPPromptProvider,
    TensorPromptProvider,
    provider_from_dict,
)


@pytest.fixture
def embedding():
    torch.manual_seed(0)
    table = nn.Embedding(100, 16)
    table.weight.data.mul_(0.05)
    return table


class WordTokenizer:
    """Splits on spaces; token id = position of the word in a fixed list (enough for init_text)."""

    words = ["Напиши", "смешной", "анекдот"]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.words.index(w) + 10 for w in text.split()]}


@pytest.mark.parametrize("make", [TensorPromptProvider, LSTMPromptProvider, MLPPromptProvider])
def test_every_provider_returns_a_differentiable_matrix(make, embedding):
    provider = make()
    provider.initialize(6, 16, embedding)
    rows = provider()
    assert rows.shape == (6, 16)
    rows.square().sum().backward()
    params = list(provider.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.requires_grad)


def test_tensor_vocab_init_takes_rows_of_the_embedding(embedding):
    provider = TensorPromptProvider()
    provider.initialize(5, 16, embedding)
    table = embedding.weight.detach()
    for row in provider.weights.detach():
        assert (table == row).all(-1).any()


def test_tensor_random_init_is_standard_normal_as_in_ruprompts(embedding):
    provider = TensorPromptProvider(init="random")
    provider.initialize(20, 16, embedding)
    assert provider.weights.std().item() == pytest.approx(1.0, rel=0.2)


def test_tensor_random_scaled_init_matches_the_embedding_scale(embedding):
    provider = TensorPromptProvider(init="random_scaled")
    provider.initialize(80, 16, embedding)
    assert provider.weights.std().item() == pytest.approx(embedding.weight.std().item(), rel=0.2)


def test_tensor_init_text_repeats_the_text_embeddings(embedding):
    provider = TensorPromptProvider(init_text="Напиши смешной анекдот")
    provider.initialize(5, 16, embedding, tokenizer=WordTokenizer())
    expected = embedding.weight.detach()[[10, 11, 12, 10, 11]]
    torch.testing.assert_close(provider.weights.detach(), expected)


def test_init_tokens_override_positions(embedding):
    provider = TensorPromptProvider(init="random")
    provider.initialize(4, 16, embedding, init_tokens={1: 42, 3: 7})
    torch.testing.assert_close(provider.weights.detach()[1], embedding.weight.detach()[42])
    torch.testing.assert_close(provider.weights.detach()[3], embedding.weight.detach()[7])


def test_init_from_a_real_tokenizer_text():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    embedding = nn.Embedding(len(tokenizer), 8)
    provider = TensorPromptProvider(init="text", init_text="анекдот")
    provider.initialize(3, 8, embedding, tokenizer=tokenizer)
    ids = tokenizer("анекдот", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(provider.weights.detach()[0], embedding.weight.detach()[ids[0]])


@pytest.mark.parametrize("make", [LSTMPromptProvider, MLPPromptProvider])
def test_network_providers_refuse_token_initialisation(make, embedding):
    with pytest.raises(UsageError, match="TensorPromptProvider"):
        make().initialize(3, 16, embedding, init_tokens={0: 5})


@pytest.mark.parametrize(("make", "kwargs"), [
    (TensorPromptProvider, {"init": "zeros"}), (TensorPromptProvider, {"init": "text"}),
    (LSTMPromptProvider, {"hidden_dim": 0}), (LSTMPromptProvider, {"num_lstm_layers": 0}),
    (MLPPromptProvider, {"input_dim": -5}),
])
def test_bad_settings_are_usage_errors(make, kwargs):
    with pytest.raises(UsageError):
        make(**kwargs)


def test_zero_length_prompt_is_refused(embedding):
    with pytest.raises(UsageError, match="prompt_length=0"):
        TensorPromptProvider().initialize(0, 16, embedding)


@pytest.mark.parametrize("make", [
    TensorPromptProvider, lambda: LSTMPromptProvider(hidden_dim=8, num_lstm_layers=1), lambda: MLPPromptProvider(4, 6),
])
def test_as_dict_rebuilds_the_same_kind_and_shapes(make, embedding):
    provider = make()
    provider.initialize(3, 16, embedding)
    again = provider_from_dict(provider.as_dict())
    assert type(again) is type(provider)
    again.load_state_dict(provider.state_dict())
    torch.testing.assert_close(again(), provider())
