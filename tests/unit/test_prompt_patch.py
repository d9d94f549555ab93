import json

import pytest
import torch

from rugpt.errors import DataError, ModelNotFound, UsageError
from rugpt.models import load
from rugpt.prompts import (
    LSTMPromptProvider,
    MLPPromptProvider,
    MultiPrompt,
    Prompt,
    PromptEmbedding,
    PromptFormat,
    TensorPromptProvider,
)

QA = {"passage": "Земля круглая.", "question": "Круглая ли Земля?"}


@pytest.fixture
def lm(tiny_model_dir):
    """A private copy of the tiny model: patching must not leak into other tests."""
    return load(str(tiny_model_dir), device="cpu")


def patched(lm, provider=None, template="<P*4>{passage}<P*4>{question}<P*4>", seed=0):
    torch.manual_seed(seed)
    return Prompt(PromptFormat(template), provider or TensorPromptProvider()).patch(lm.model, lm.tokenizer)


def encode(lm, texts):
    lm.tokenizer.padding_side = "left"
    return lm.tokenizer(texts, return_tensors="pt", padding=True)


def logits(lm, batch):
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    with torch.no_grad():
        return lm.model(**batch, position_ids=positions).logits


def manual_greedy(lm, ids, steps):
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(lm.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_patched_generate_matches_a_manual_argmax_loop(lm):
    prompt = patched(lm)
    ids = lm.tokenizer(prompt(**QA))["input_ids"]
    assert ids.count(lm.tokenizer.convert_tokens_to_ids("<|P|>")) == 12
    out = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out[0, len(ids):].tolist() == manual_greedy(lm, ids, 8)


def test_the_prompt_rows_are_what_the_model_sees(lm):
    prompt = patched(lm)
    batch = encode(lm, [prompt(**QA)])
    before = logits(lm, batch)
    with torch.no_grad():
        prompt.provider.weights.add_(0.5)
    assert not torch.allclose(before, logits(lm, batch))
    plain = encode(lm, ["Земля круглая."])
    prompt.unpatch()
    reference = logits(lm, plain)
    prompt.patch(lm.model, lm.tokenizer)
    torch.testing.assert_close(logits(lm, plain), reference, rtol=0, atol=0)  # no prompt tokens: untouched


def test_a_row_gives_the_same_logits_alone_and_left_padded_in_a_batch(lm):
    prompt = patched(lm)
    rows = [prompt(**QA), prompt(passage="Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный.",
                                 question="Что за день?")]
    batch = encode(lm, rows)
    together = logits(lm, batch)
    for i, row in enumerate(rows):
        alone = logits(lm, encode(lm, [row]))[0]
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(together[i][real], alone, rtol=1e-4, atol=1e-4)


def test_batched_generate_equals_generating_each_row_alone(lm):
    prompt = patched(lm)
    rows = [prompt(**QA), prompt(passage="Длинный текст о погоде и о море.", question="О чём текст?")]
    batch = encode(lm, rows)
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = lm.model.generate(**batch, **common)[:, batch["input_ids"].shape[1]:]
    for i, row in enumerate(rows):
        single = encode(lm, [row])
        alone = lm.model.generate(**single, **common)[0, single["input_ids"].shape[1]:]
        assert together[i].tolist() == alone.tolist()


def test_unpatch_restores_the_original_module_and_logits(lm):
    batch = encode(lm, ["Мороз и солнце"])
    original, reference = lm.model.get_input_embeddings(), logits(lm, batch)
    prompt = patched(lm)
    assert isinstance(lm.model.get_input_embeddings(), PromptEmbedding)
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight  # tying survives the patch
    prompt.unpatch()
    assert lm.model.get_input_embeddings() is original
    torch.testing.assert_close(logits(lm, batch), reference, rtol=0, atol=0)


def test_a_row_with_part_of_the_prompt_is_an_error(lm):
    prompt = patched(lm)
    ids = lm.tokenizer(prompt(**QA))["input_ids"][3:]  # lost three prompt tokens, as a left cut would
    with pytest.raises(UsageError, match="holds 9 prompt tokens"):
        lm.model(torch.tensor([ids]))


@pytest.mark.parametrize("make", [TensorPromptProvider, lambda: LSTMPromptProvider(hidden_dim=16),
                                  lambda: MLPPromptProvider(hidden_dim=8)])
def test_save_and_load_round_trip_keeps_the_provider_kind(lm, tmp_path, make):
    prompt = patched(lm, make())
    text = prompt(**QA)
    reference = logits(lm, encode(lm, [text]))
    saved = prompt.save_pretrained(tmp_path / "p")
    assert set(saved.files) == {"prompt.json", "prompt_provider.safetensors", "prompt_provider.bin"}
    assert saved.size_bytes == sum(f.stat().st_size for f in (tmp_path / "p").iterdir())
    prompt.unpatch()

    loaded = Prompt.from_pretrained(tmp_path / "p")
    assert type(loaded.provider) is type(prompt.provider)
    loaded.patch(lm.model, lm.tokenizer)
    torch.testing.assert_close(logits(lm, encode(lm, [text])), reference)
    loaded.provider().sum().backward()  # trainable further, as itself
    assert all(p.grad is not None for p in loaded.parameters())


def write_ruprompts_folder(folder, weights, template="<P*3>{text}<P>", model="sberbank-ai/rugpt3large_based_on_gpt2"):
    """The layout ruPrompts' Prompt.save_pretrained writes: prompt.json + torch-saved tensor."""
    folder.mkdir()
    compiled = template.replace("<P*3>", "<|P|>" * 3).replace("<P>", "<|P|>")
    spec = {"format": {"template": template, "compiled_template": compiled},
            "config": {"embedding_dim": weights.shape[1], "prompt_length": weights.shape[0],
                       "pretrained_model_name": model, "is_safe": False}}
    (folder / "prompt.json").write_text(json.dumps(spec))
    torch.save(weights, folder / "prompt_provider.bin")
    return folder


def test_a_prompt_saved_by_ruprompts_loads_and_applies(lm, tmp_path):
    weights = torch.randn(4, 32) * 0.1
    folder = write_ruprompts_folder(tmp_path / "ru", weights)
    prompt = Prompt.from_pretrained(folder).patch(lm.model, lm.tokenizer)
    torch.testing.assert_close(prompt.provider.weights.detach(), weights)
    assert prompt(text="Привет") == "<|P|>" * 3 + "Привет<|P|>"
    ids = torch.tensor([lm.tokenizer(prompt(text="Привет"))["input_ids"]])
    embeds = lm.model.get_input_embeddings()(ids)[0]
    torch.testing.assert_close(embeds[[0, 1, 2, -1]], weights)


def test_a_ruprompts_bin_with_pickled_objects_is_refused(tmp_path):
    folder = write_ruprompts_folder(tmp_path / "evil", torch.zeros(4, 8))
    torch.save({"weights": torch.zeros(4, 8), "payload": ValueError("not a tensor")}, folder / "prompt_provider.bin")
    with pytest.raises(DataError, match="objects other than tensors.*weights-only loader"):
        Prompt.from_pretrained(folder)


def test_a_prompt_for_another_hidden_size_is_one_clear_error(lm, tmp_path):
    folder = write_ruprompts_folder(tmp_path / "large", torch.zeros(4, 1536))
    with pytest.raises(UsageError, match=r"hidden size 1536 \(sberbank-ai/rugpt3large_based_on_gpt2\).*hidden size 32"):
        Prompt.from_pretrained(folder).patch(lm.model, lm.tokenizer)
    mine = Prompt("<P*2>{text}", TensorPromptProvider.from_tensor(torch.zeros(2, 64)))
    with pytest.raises(UsageError, match="hidden size 64.*hidden size 32"):
        mine.patch(lm.model, lm.tokenizer)


def test_missing_prompt_folder_or_offline_hub_id(tmp_path):
    with pytest.raises(ModelNotFound, match="neither a folder"):
        Prompt.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match="offline"):
        Prompt.from_pretrained("konodyuk/prompt_rugpt3large_joke")


def test_multi_prompt_serves_different_prompts_in_one_batch(lm, tmp_path):
    torch.manual_seed(1)
    joke = Prompt("<P*3>{text}", TensorPromptProvider(init="random"))
    qa = Prompt("<P*2>{passage}<P*2>{question}", TensorPromptProvider(init="random"))
    multi = MultiPrompt({"joke": joke, "qa": qa}).patch(lm.model, lm.tokenizer)
    rows = [multi("joke", "Заходит улитка в бар"), multi("qa", **QA)]
    assert rows[0].startswith("<|[joke]P|>") and rows[1].startswith("<|[qa]P|>")
    together = logits(lm, encode(lm, rows))
    batch = encode(lm, rows)
    for i, row in enumerate(rows):
        alone = logits(lm, encode(lm, [row]))[0]
        torch.testing.assert_close(together[i][batch["attention_mask"][i].bool()], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match="keys: joke, qa"):
        multi("nope", "x")


def test_push_to_hub_offline_is_one_clear_error(lm):
    prompt = patched(lm)
    with pytest.raises(UsageError, match="cannot push the prompt to 'someone/prompt'.*offline"):
        prompt.push_to_hub("someone/prompt")


def test_text_slots_start_from_the_embeddings_of_their_tokens(lm):
    prompt = Prompt("<P>Ответ на вопрос:</P>{text}<P*2>").patch(lm.model, lm.tokenizer)
    ids = lm.tokenizer("Ответ на вопрос:", add_special_tokens=False)["input_ids"]
    assert prompt.format.prompt_length == len(ids) + 2
    table = lm.model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(prompt.provider.weights.detach()[: len(ids)], table[ids])


def test_render_puts_a_user_text_where_the_format_wants_it(lm):
    def prompt(template):
        return Prompt(PromptFormat(template, tokenizer=lm.tokenizer))

    assert prompt("<P*2>").render("Заходит улитка") == "<|P|>" * 2 + "Заходит улитка"
    assert prompt("<P>{text}<P>").render("да") == "<|P|>да<|P|>"
    two = prompt("<P>{context}<P>{question}")
    assert two.render('{"context": "Трава зелёная.", "question": "Какая?"}') == "<|P|>Трава зелёная.<|P|>Какая?"
    with pytest.raises(UsageError, match='JSON object such as {"context": "...", "question": "..."}'):
        two.render("просто текст")
