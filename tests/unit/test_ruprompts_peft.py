"""A trained prompt goes to PEFT and back with the same logits, and any saved prompt works with plain
transformers `generate(inputs_embeds=...)` through the function docs/prompt_tuning.md shows (ruPrompts issue #4)."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from rugpt.errors import UsageError
from rugpt.prompts import LSTMPromptProvider, Prompt, PromptFormat, TensorPromptProvider

peft = pytest.importorskip("peft", reason="peft (the train extra) is not installed")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "prompt_tuning.md"
TEXT = "Мороз и солнце; день чудесный"


@pytest.fixture
def fresh(tiny_model_dir):
    """A fresh copy of the tiny model and its tokenizer each call: patching changes them."""
    def make():
        return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)

    return make


def trained_prompt(model, tokenizer, template="<P*4>{text}", provider=None, seed=0):
    torch.manual_seed(seed)
    prompt = Prompt(PromptFormat(template), provider or TensorPromptProvider(init="random")).patch(model, tokenizer)
    return prompt


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("provider", [TensorPromptProvider, lambda: LSTMPromptProvider(hidden_dim=8)])
def test_export_loads_in_peft_with_the_same_logits_and_generation(provider, fresh, tmp_path):
    model, tokenizer = fresh()
    prompt = trained_prompt(model, tokenizer, provider=provider())
    ids = tokenizer(prompt(text=TEXT), return_tensors="pt").input_ids
    saved = prompt.save_peft_adapter(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(saved.files)

    base, _ = fresh()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids  # PEFT is fed the text, the prompt goes before it
    torch.testing.assert_close(logits(peft_model, text_ids)[:, 4:], logits(model, ids)[:, 4:])

    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)[0, ids.shape[1]:]
        theirs = peft_model.generate(input_ids=text_ids, attention_mask=torch.ones_like(text_ids), **greedy)
    assert theirs[0, -6:].tolist() == ours.tolist()


def test_an_adapter_made_by_peft_imports_with_the_same_logits(fresh, tmp_path):
    base, tokenizer = fresh()
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    expected = logits(peft_model.eval(), text_ids)[:, 3:]

    prompt = Prompt.from_pretrained(tmp_path / "adapter")
    assert prompt.format.template == "<P*3>{text}" and prompt.is_initialized
    model, tokenizer = fresh()
    prompt.patch(model, tokenizer)
    ids = tokenizer(prompt(text=TEXT), return_tensors="pt").input_ids
    torch.testing.assert_close(logits(model, ids)[:, 3:], expected)


def test_a_p_tuning_adapter_imports_as_its_encoders_rows(fresh, tmp_path):
    base, tokenizer = fresh()
    config = peft.PromptEncoderConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=2, encoder_hidden_size=8)
    peft_model = peft.get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    expected = logits(peft_model.eval(), text_ids)[:, 2:]
    model, tokenizer = fresh()
    prompt = Prompt.from_pretrained(tmp_path / "adapter").patch(model, tokenizer)
    ids = tokenizer(prompt(text=TEXT), return_tensors="pt").input_ids
    torch.testing.assert_close(logits(model, ids)[:, 2:], expected)


def test_round_trip_keeps_the_format_and_the_rows(fresh, tmp_path):
    model, tokenizer = fresh()
    prompt = trained_prompt(model, tokenizer, template="<P*3>Вопрос: {question}\nОтвет:")
    prompt.save_peft_adapter(tmp_path / "adapter")
    back = Prompt.from_pretrained(tmp_path / "adapter")
    assert back.format.as_dict() == prompt.format.as_dict()
    torch.testing.assert_close(back.provider(), prompt.provider().detach())
    assert back.config.embedding_dim == 32


@pytest.mark.parametrize("template", ["{text}<P*3>", "<P*2>{text}<P>", "<P>Ответ:</P>{text}<P*2>"])
def test_only_formats_with_all_prompt_tokens_first_export(template, fresh, tmp_path):
    model, tokenizer = fresh()
    prompt = trained_prompt(model, tokenizer, template=template, provider=TensorPromptProvider())
    with pytest.raises(UsageError, match="cannot be a PEFT prompt-tuning adapter"):
        prompt.save_peft_adapter(tmp_path / "adapter")


def test_other_peft_adapters_are_refused_by_name(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "CAUSAL_LM"}')
    with pytest.raises(UsageError, match="PEFT LORA adapter"):
        Prompt.from_pretrained(folder)


def doc_function():
    """The `prompt_embeds` function from docs/prompt_tuning.md, run as written."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    [block] = [b for b in blocks if "def prompt_embeds" in b]
    code = block.split("\n\nembeds = ")[0]  # the definition; the usage lines below need a real folder
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace["prompt_embeds"]


@pytest.mark.parametrize(("template", "provider", "fields"), [
    ("<P*3>{context}<P*2>{question}<P>", TensorPromptProvider, {"context": "Трава зелёная.", "question": "Какая?"}),
    ("{{Ответ}}: <P>Ответь:</P>{text}<P*2>", TensorPromptProvider, {"text": TEXT}),
    ("<P*4>{text}", lambda: LSTMPromptProvider(hidden_dim=8), {"text": TEXT}),
])
def test_plain_generate_with_the_docs_function_matches_the_patched_model(template, provider, fields, fresh, tmp_path):
    model, tokenizer = fresh()
    prompt = trained_prompt(model, tokenizer, template=template, provider=provider())
    prompt.save_pretrained(tmp_path / "p")
    ids = tokenizer(prompt(**fields), return_tensors="pt").input_ids
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)[0, ids.shape[1]:]

    plain, plain_tokenizer = fresh()  # never patched: only transformers and the saved files
    embeds = doc_function()(plain, plain_tokenizer, str(tmp_path / "p"), **fields)
    assert embeds.shape[1] == ids.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(embeds, model.get_input_embeddings()(ids))
        out = plain.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             **greedy)
    assert out[0].tolist() == expected.tolist()
