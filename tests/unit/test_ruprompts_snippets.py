"""Code from ruPrompts' README, docs and tutorial notebooks, run with `ruprompts` changed to `rugpt.prompts` in
its imports. Besides that, only what this machine needs changes, noted where it does: the hub is a cache
holding tiny stand-ins under the published names (offline, no downloads), sizes shrink, `device=0` goes,
and transformers 5's renames apply (torch's AdamW, `eval_strategy`, no `logging_dir`)."""

import csv
import shutil

import pytest
import torch
from test_ruprompts_published import write_ruprompts_folder

from conftest import build_tiny_model

PROMPTS = {  # the published prompts' names, with formats of their kind, at the tiny model's width
    "konodyuk/prompt_rugpt3large_joke": "<P*5>",
    "konodyuk/prompt_rugpt3large_proverb": "<P*4>",
    "konodyuk/prompt_rugpt3large_detox_russe": "<P*4>{toxic_comment}<P*2>",
    "konodyuk/prompt_rugpt3large_summarization_mlsum": "<P*4>{text}<P*2>",
    "konodyuk/prompt_rugpt3large_qa_sberquad": "<P*3>{context}<P*2>{question}<P*2>",
}
MODELS = ("ai-forever/rugpt3large_based_on_gpt2", "sberbank-ai/rugpt3large_based_on_gpt2")
CONTEXT = "В 2014 году Шмидхубер основал компанию Nnaisense. Сепп Хохрайтер занимает в компании пост советника."


def _snapshot(cache, hub_id):
    storage = cache / f"models--{hub_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("a" * 40)
    return storage / "snapshots" / ("a" * 40)


@pytest.fixture(scope="module")
def large_stand_in(tmp_path_factory):
    """The tiny model with room for ruPrompts' default of 100 new tokens after a prompt."""
    return build_tiny_model(tmp_path_factory.mktemp("rugpt3large"), n_positions=256)


@pytest.fixture
def hub(monkeypatch, tmp_path, large_stand_in):
    """The hub cache, with tiny stand-ins for ruGPT-3 Large and the published prompts."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for hub_id in MODELS:
        shutil.copytree(large_stand_in, _snapshot(cache, hub_id))
    torch.manual_seed(0)
    for hub_id, template in PROMPTS.items():
        from rugpt.prompts.prompt_format import PromptFormat

        compiled = PromptFormat(template, tokenizer=object()).compiled_template
        rows = torch.randn(compiled.count("<|P|>"), 32)
        write_ruprompts_folder(_snapshot(cache, hub_id), rows, template, compiled, model=MODELS[1])
    return cache


def test_readme_and_quick_start(hub):
    from transformers import pipeline

    import rugpt.prompts  # noqa: F401  (was: import ruprompts)

    ppln_joke = pipeline("text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_joke")
    assert ppln_joke("Говорит кружка ложке")[0]["generated_text"].startswith("Говорит кружка ложке")

    ppln_detox = pipeline("text2text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_detox_russe")
    assert isinstance(ppln_detox("Опять эти тупые дятлы все испортили, чтоб их черти взяли")[0]["generated_text"], str)

    ppln_qa = pipeline("text2text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_qa_sberquad")
    assert isinstance(ppln_qa(context="Трава зеленая.", question="Какая трава?")[0]["generated_text"], str)

    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_id = "ai-forever/rugpt3large_based_on_gpt2"
    model = GPT2LMHeadModel.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)

    ppln_joke = pipeline(
        "text-generation-with-prompt",
        prompt="konodyuk/prompt_rugpt3large_joke",
        model=model, tokenizer=tokenizer)
    ppln_joke("Говорит как-то дуб вороне")  # the docs write ppln_joke(...)

    ppln_qa = pipeline(
        "text-generation-with-prompt",
        prompt="konodyuk/prompt_rugpt3large_qa_sberquad",
        model=model, tokenizer=tokenizer)
    # the docs write ppln_qa(...); a text-generation prompt with two fields takes them as JSON in rugpt
    ppln_qa('{"context": "Трава зеленая.", "question": "Какая трава?"}')


def test_pretrained_inference_notebook(hub):
    from transformers import pipeline

    import rugpt.prompts  # noqa: F401  (was: import ruprompts)

    ppln_joke = pipeline("text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_joke")
    ppln_joke("Говорит как-то дуб вороне")

    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_id = "sberbank-ai/rugpt3large_based_on_gpt2"
    model = GPT2LMHeadModel.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)

    ppln_proverb = pipeline("text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_proverb", model=model,
                            tokenizer=tokenizer)
    ppln_proverb("Сколько ни")

    ppln_detox = pipeline("text2text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_detox_russe",
                          model=model, tokenizer=tokenizer)
    ppln_detox({"toxic_comment": "Ублюдок, мать твою, а ну иди сюда"})

    long_text = "Несмотря на споры, большинство учёных сошлись во мнении, что кошка является полуодомашненным животным."
    ppln_summary = pipeline("text2text-generation-with-prompt",
                            prompt="konodyuk/prompt_rugpt3large_summarization_mlsum", model=model, tokenizer=tokenizer)
    # the notebook asks num_return_sequences=5 of num_beams=2, which transformers refuses (then and now)
    summaries = ppln_summary(long_text, num_beams=2, num_return_sequences=2)
    assert len(summaries) == 2

    ppln_qa = pipeline("text2text-generation-with-prompt", prompt="konodyuk/prompt_rugpt3large_qa_sberquad",
                       model=model, tokenizer=tokenizer)
    greedy_qa = ppln_qa({"context": CONTEXT, "question": "В каком году была основана Nnaisense?"}, do_sample=False)

    from rugpt.prompts import MultiPrompt

    mp = MultiPrompt({
        "detox": "konodyuk/prompt_rugpt3large_detox_russe",
        "qa": "konodyuk/prompt_rugpt3large_qa_sberquad",
    })
    mp.patch(model, tokenizer)

    ppln = pipeline("text-generation", model=model, tokenizer=tokenizer, return_full_text=False, do_sample=True,
                    eos_token_id=0, max_new_tokens=100)
    ppln(mp(key="detox", toxic_comment="Какого черта ты сюда припёрся?"))
    answer = ppln(mp(key="qa", context=CONTEXT, question="В каком году была основана Nnaisense?"), do_sample=False)
    assert answer[0]["generated_text"] == greedy_qa[0]["generated_text"]  # the same prompt, its own token


def test_detox_inference_notebook(hub):
    from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

    from rugpt.prompts import Prompt

    backbone_id = "ai-forever/rugpt3large_based_on_gpt2"

    prompt = Prompt.from_pretrained("konodyuk/prompt_rugpt3large_detox_russe")
    model = GPT2LMHeadModel.from_pretrained(backbone_id)
    tokenizer = AutoTokenizer.from_pretrained(backbone_id)

    ppln = pipeline("text2text-generation-with-prompt", prompt=prompt, model=model, tokenizer=tokenizer)
    valid_toxic_comments = ["Ублюдок, мать твою, а ну иди сюда", "Отвали, дурак"]  # was: a TSV via datasets

    beam_count = 2  # was 10
    predictions = []
    for i in valid_toxic_comments:
        options = ppln(i, do_sample=False, num_beams=beam_count, num_return_sequences=beam_count)
        options = [i["generated_text"].replace("<pad>", "") for i in options]
        answer = sorted(options, key=len)[-1]  # get longest answer
        predictions.append(answer)
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)


class _Dataset(list):
    """The part of datasets.Dataset the notebook uses (datasets is not a dependency here)."""

    def map(self, function):
        return _Dataset({**row, **function(row)} for row in self)

    def __getitem__(self, key):
        return [row[key] for row in self] if isinstance(key, str) else list.__getitem__(self, key)


def load_dataset(kind, data_files, sep=","):
    assert kind == "csv"
    result = {}
    for split, path in data_files.items():
        with open(path, encoding="utf-8", newline="") as f:
            result[split] = _Dataset(csv.DictReader(f, delimiter=sep))
    return result


def test_training_notebook_with_trainer_and_callbacks(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = [("Ты дурак", "Ты не прав"), ("Отвали", "Уйди, пожалуйста"), ("Заткнись уже", "Помолчи, пожалуйста"),
             ("Тупой вопрос", "Странный вопрос")]
    for name, rows in (("train.tsv", pairs * 2), ("dev.tsv", pairs[:2])):
        with open(name, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["toxic_comment", "neutral_comment1"])
            writer.writerows(rows)

    datasets = load_dataset("csv", data_files={"train": "train.tsv", "validation": "dev.tsv"}, sep="\t")
    train_dataset = datasets["train"]
    valid_dataset = datasets["validation"]

    from transformers import AutoTokenizer, GPT2LMHeadModel

    backbone_id = str(tiny_model_dir)  # was: "ai-forever/rugpt3large_based_on_gpt2"

    model = GPT2LMHeadModel.from_pretrained(backbone_id)
    # ruGPT-3's "<pad>" is id 0, as the tiny model's "<|endoftext|>"
    tokenizer = AutoTokenizer.from_pretrained(backbone_id, pad_token="<|endoftext|>", eos_token="<|endoftext|>")

    from rugpt.prompts import PromptFormat

    prompt_format = PromptFormat("<P*10>{toxic_comment}<P*2>")  # was <P*100>...<P*20>

    from transformers import set_seed

    from rugpt.prompts import TensorPromptProvider

    set_seed(1)

    prompt_provider = TensorPromptProvider()

    from rugpt.prompts import Prompt

    prompt = Prompt(prompt_format, prompt_provider)
    prompt.patch(model, tokenizer)

    from rugpt.prompts import Text2TextPreprocessor

    preprocessor = Text2TextPreprocessor(
        prompt_format=prompt_format,
        tokenizer=tokenizer,
        target_field="neutral_comment1",
        max_tokens=64,  # was 1792
        truncation_field="toxic_comment",
    )

    train_dataset = train_dataset.map(preprocessor)
    valid_dataset = valid_dataset.map(preprocessor)

    from transformers import TrainingArguments

    training_args = TrainingArguments(
        output_dir=".",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=1,
        eval_steps=2,  # was 1000
        save_steps=2,  # was 1000
        logging_steps=100,
        eval_strategy="steps",  # transformers 5: was evaluation_strategy
        save_strategy="steps",
        logging_strategy="steps",
        save_total_limit=2,
        metric_for_best_model="eval_loss",
        learning_rate=0.1,
        max_steps=2,  # was 100000
        report_to="none",  # was "tensorboard" (not installed here); transformers 5 has no logging_dir
        seed=1,
        use_cpu=True,
    )

    from torch.optim import AdamW  # transformers 5: was from transformers.optimization
    from transformers.optimization import get_linear_schedule_with_warmup

    optimizer = AdamW(prompt_provider.parameters(), lr=training_args.learning_rate)
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=1,  # was 2000
        num_training_steps=training_args.max_steps,
    )

    from transformers import Trainer

    from rugpt.prompts.callbacks import (
        FreezeTransformerUnfreezePrompt,
        ReduceCheckpoint,
        SavePretrainedPrompt,
    )

    frozen = {k: v.clone() for k, v in model.state_dict().items() if "prompt_provider" not in k}
    start = prompt_provider.weights.detach().clone()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=valid_dataset,
        data_collator=preprocessor.collate_fn(),
        optimizers=(optimizer, scheduler),
        callbacks=[FreezeTransformerUnfreezePrompt(), ReduceCheckpoint(), SavePretrainedPrompt(prompt)],
    )

    trainer.train()

    from transformers import pipeline

    prompt = Prompt.from_pretrained(f"./checkpoint-{training_args.max_steps}")

    ppln = pipeline("text2text-generation-with-prompt", prompt=prompt, model=model, tokenizer=tokenizer)
    answer = ppln({"toxic_comment": "Ублюдок, мать твою, а ну иди сюда"}, do_sample=False)
    assert isinstance(answer[0]["generated_text"], str)

    # what the callbacks promise: only the prompt trained, checkpoints hold only it, the prompt is saved in each
    from safetensors.torch import load_file

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(prompt_provider.weights.detach(), start)
    torch.testing.assert_close(prompt.provider.weights.detach(), prompt_provider.weights.detach())
    assert list(load_file("checkpoint-2/model.safetensors")) == ["transformer.wte.prompt_provider.weights"]


def test_prompt_docstring_example(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from rugpt.prompts import Prompt, PromptFormat, TensorPromptProvider

    monkeypatch.chdir(tmp_path)
    model, tokenizer = GPT2LMHeadModel.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)

    p = Prompt(PromptFormat("<P*50>"), TensorPromptProvider())
    p.patch(model, tokenizer)
    p.save_pretrained("./checkpoint/path")

    p = Prompt.from_pretrained("./checkpoint/path")
    p.patch(model, tokenizer)

    a = p(toxic="...")
    b = p.format(toxic="...")
    assert a == b
