import pytest
import torch
from transformers import pipeline as transformers_pipeline

from rugpt.errors import UsageError
from rugpt.models import load
from rugpt.prompts import Prompt, PromptFormat, TensorPromptProvider, pipeline

GREEDY = dict(do_sample=False, max_new_tokens=5)


@pytest.fixture(scope="module")
def saved_prompts(tiny_model_dir, tmp_path_factory):
    """A QA prompt (two fields) and a joke prompt (no fields), trained for nothing but saved like real ones."""
    lm = load(str(tiny_model_dir), device="cpu")
    root = tmp_path_factory.mktemp("prompts")
    torch.manual_seed(0)
    for name, template in (("qa", "<P*3>{context}<P*2>{question}<P*2>"), ("joke", "<P*5>")):
        prompt = Prompt(PromptFormat(template), TensorPromptProvider(init="random")).patch(lm.model, lm.tokenizer)
        prompt.save_pretrained(root / name)
    return root


@pytest.fixture
def lm(tiny_model_dir):
    return load(str(tiny_model_dir), device="cpu")


def greedy_continuation(lm, text: str, steps: int) -> str:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                            pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_text2text_pipeline_takes_keyword_fields(lm, saved_prompts):
    qa = transformers_pipeline("text2text-generation-with-prompt", prompt=str(saved_prompts / "qa"), model=lm.model,
                               tokenizer=lm.tokenizer)
    answer = qa(context="Трава зелёная.", question="Какая трава?", **GREEDY)[0]["generated_text"]
    expected = greedy_continuation(lm, qa.prompt(context="Трава зелёная.", question="Какая трава?"), 5)
    assert answer == expected
    assert qa({"context": "Трава зелёная.", "question": "Какая трава?"}, **GREEDY)[0]["generated_text"] == answer
    with pytest.raises(UsageError, match="both"):
        qa({"context": "x", "question": "y"}, question="z")


def test_text2text_pipeline_batches_like_single_calls(lm, saved_prompts):
    qa = pipeline("text2text-generation-with-prompt", prompt=saved_prompts / "qa", model=lm.model,
                  tokenizer=lm.tokenizer)
    rows = [{"context": "Трава зелёная.", "question": "Какая трава?"},
            {"context": "Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный.", "question": "Какой день?"}]
    batched = qa(rows, batch_size=2, **GREEDY)
    assert [b[0]["generated_text"] for b in batched] == [qa(row, **GREEDY)[0]["generated_text"] for row in rows]


def test_text_generation_pipeline_continues_after_the_prompt(lm, saved_prompts):
    joke = pipeline("text-generation-with-prompt", prompt=str(saved_prompts / "joke"), model=lm.model,
                    tokenizer=lm.tokenizer)
    text = joke("Заходит улитка в бар", **GREEDY)[0]["generated_text"]
    assert text == "Заходит улитка в бар" + greedy_continuation(lm, "<|P|>" * 5 + "Заходит улитка в бар", 5)


def test_pipeline_without_a_model_loads_the_one_in_the_prompt_config(tiny_model_dir, saved_prompts):
    qa = pipeline("text2text-generation-with-prompt", prompt=str(saved_prompts / "qa"))
    assert qa.prompt.config.pretrained_model_name == str(tiny_model_dir)
    assert isinstance(qa(context="a", question="b", **GREEDY)[0]["generated_text"], str)
    with pytest.raises(UsageError, match="not a prompt pipeline"):
        pipeline("text-generation", prompt=str(saved_prompts / "qa"))
