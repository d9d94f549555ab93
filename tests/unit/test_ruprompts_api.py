"""ruPrompts 0.1.4's public API, called as its users call it: names, signatures, defaults, the order of steps,
the exceptions. The classes TestPrompt ... TestText2TextPreprocessor are ruPrompts' own tests (its repository's
tests/), with `ruprompts` changed to `rugpt.prompts` and its fixture model swapped for the tiny one."""

import importlib
import inspect

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedModel, pipeline

import rugpt.prompts
from rugpt.errors import UsageError
from rugpt.prompts.pipelines import Text2TextGenerationWithPromptPipeline, TextGenerationWithPromptPipeline
from rugpt.prompts.preprocessing import Text2TextPreprocessor
from rugpt.prompts.prompt import MultiPrompt, Prompt
from rugpt.prompts.prompt_format import PromptFormat, PromptFormatSafe
from rugpt.prompts.prompt_provider import LSTMPromptProvider, TensorPromptProvider

REQUIRED = inspect.Parameter.empty

# (module, object path, [(parameter, default)...]) as in ruprompts 0.1.4's source; rugpt may add parameters
# after these, each with a default, and may give a required one a default.
SIGNATURES = [
    ("prompt_format", "BasePromptFormat.__call__", [("items", None), ("return_ranges", False), ("kwargs", None)]),
    ("prompt_format", "BasePromptFormat.batch_format", [("items", REQUIRED), ("return_ranges", False)]),
    ("prompt_format", "PromptFormat.__init__", [("template", REQUIRED), ("compiled_template", None),
                                                ("tokenizer", None)]),
    ("prompt_format", "PromptFormat.format", [("item", REQUIRED), ("return_ranges", False)]),
    ("prompt_format", "PromptFormat.initialize", [("tokenizer", REQUIRED)]),
    ("prompt_format", "PromptFormat.set_key", [("key", None)]),
    ("prompt_format", "PromptFormat.add_tokens", [("tokenizer", REQUIRED)]),
    ("prompt_format", "PromptFormat.as_dict", []),
    ("prompt_format", "PromptFormat.build_repeated_tokens", [("template", REQUIRED), ("kwargs", None)]),
    ("prompt_format", "PromptFormat.build_initialized_tokens", [("template", REQUIRED), ("tokenizer", REQUIRED),
                                                                ("kwargs", None)]),
    ("prompt_format", "PromptFormat.build_regular_tokens", [("template", REQUIRED), ("kwargs", None)]),
    ("prompt_provider", "BasePromptProvider.initialize", [("prompt_length", REQUIRED), ("embedding_dim", REQUIRED),
                                                          ("embedding", REQUIRED), ("init_tokens", REQUIRED)]),
    ("prompt_provider", "BasePromptProvider.save_pretrained", [("output_file", REQUIRED)]),
    ("prompt_provider", "TensorPromptProvider.__init__", [("init", "vocab")]),
    ("prompt_provider", "TensorPromptProvider.initialize", [("prompt_length", REQUIRED), ("embedding_dim", REQUIRED),
                                                            ("embedding", REQUIRED), ("init_tokens", REQUIRED)]),
    ("prompt_provider", "TensorPromptProvider.from_pretrained", [("weights", REQUIRED)]),
    ("prompt_provider", "LSTMPromptProvider.__init__", [("hidden_dim", -1), ("input_dim", -1),
                                                        ("num_lstm_layers", 2)]),
    ("prompt_embedding", "PromptEmbedding.__init__", [("embedding", REQUIRED), ("prompt_provider", REQUIRED),
                                                      ("prompt_token_ids", REQUIRED)]),
    ("prompt_embedding", "PromptEmbedding.forward", [("input_ids", REQUIRED)]),
    ("prompt_embedding", "PromptEmbedding.check_contains_prompt_token_ids", [("input_ids", REQUIRED)]),
    ("prompt_embedding", "PromptEmbeddingSafe.__init__", [("embedding", REQUIRED), ("prompt_provider", REQUIRED),
                                                          ("prompt_token_ids", REQUIRED)]),
    ("prompt_embedding", "MultiPromptEmbedding.__init__", [("default_embedding", REQUIRED),
                                                           ("embeddings", REQUIRED)]),
    ("prompt", "PromptConfig.__init__", [("embedding_dim", None), ("prompt_length", None),
                                         ("pretrained_model_name", None), ("is_safe", False)]),
    ("prompt", "PromptContext.__init__", [("is_initialized", False), ("is_attached", False), ("model", None),
                                          ("tokenizer", None), ("embedding", None)]),
    ("prompt", "Prompt.__init__", [("format", REQUIRED), ("provider", REQUIRED), ("config", None)]),
    ("prompt", "Prompt.patch", [("model", REQUIRED), ("tokenizer", REQUIRED)]),
    ("prompt", "Prompt.initialize", [("model", REQUIRED), ("tokenizer", REQUIRED)]),
    ("prompt", "Prompt.attach", [("model", REQUIRED), ("tokenizer", REQUIRED)]),
    ("prompt", "Prompt.detach", [("model", None)]),
    ("prompt", "Prompt.save_pretrained", [("save_directory", REQUIRED), ("push_to_hub", False), ("kwargs", None)]),
    ("prompt", "Prompt.from_pretrained", [("pretrained_prompt_name_or_path", REQUIRED), ("as_safe", False)]),
    ("prompt", "Prompt.push_to_hub", [("repo_id", REQUIRED), ("use_temp_dir", None), ("commit_message", None),
                                      ("private", None)]),
    ("prompt", "Prompt.get_default_model", []),
    ("prompt", "Prompt.get_default_tokenizer", []),
    ("prompt", "Prompt.__call__", [("text", None)]),
    ("prompt", "Prompt.as_dict", []),
    ("prompt", "MultiPrompt.__init__", [("prompts", None)]),
    ("prompt", "MultiPrompt.add_prompt", [("key", REQUIRED), ("prompt", REQUIRED)]),
    ("prompt", "MultiPrompt.__call__", [("key", REQUIRED), ("text", None)]),
    ("prompt", "MultiPrompt.patch", [("model", REQUIRED), ("tokenizer", REQUIRED)]),
    ("prompt", "MultiPrompt.initialize", [("model", REQUIRED), ("tokenizer", REQUIRED)]),
    ("prompt", "MultiPrompt.attach", [("model", REQUIRED), ("tokenizer", REQUIRED)]),
    ("preprocessing", "BasePreprocessor.__call__", [("items", REQUIRED)]),
    ("preprocessing", "Text2TextPreprocessor.__init__", [("prompt_format", REQUIRED), ("tokenizer", REQUIRED),
                                                         ("target_field", REQUIRED), ("max_tokens", None),
                                                         ("truncation_field", None)]),
    ("preprocessing", "Text2TextPreprocessor.process", [("item", REQUIRED)]),
    ("preprocessing", "Text2TextPreprocessor.batch_process", [("item", REQUIRED)]),
    ("preprocessing", "Text2TextPreprocessor.collate_fn", [("kwargs", None)]),
    ("pipelines", "PromptPipeline.__init__", [("prompt", REQUIRED), ("args", None), ("kwargs", None)]),
    ("pipelines", "PromptPipeline.load_prompt_patch_model", [("prompt", REQUIRED)]),
    ("pipelines", "PromptPipeline.add_default_kwargs", [("kwargs", REQUIRED)]),
    ("pipelines", "TextGenerationWithPromptPipeline.preprocess", [("input_text", REQUIRED), ("kwargs", None)]),
    ("pipelines", "Text2TextGenerationWithPromptPipeline.preprocess", [("inputs", REQUIRED), ("kwargs", None)]),
    ("callbacks", "FreezeTransformerUnfreezePrompt.on_train_begin", [("args", REQUIRED), ("state", REQUIRED),
                                                                     ("control", REQUIRED), ("model", REQUIRED),
                                                                     ("kwargs", None)]),
    ("callbacks", "ReduceCheckpoint.on_save", [("args", REQUIRED), ("state", REQUIRED), ("control", REQUIRED),
                                               ("kwargs", None)]),
    ("callbacks", "SavePretrainedPrompt.__init__", [("prompt", REQUIRED)]),
    ("callbacks", "SavePretrainedPrompt.on_save", [("args", REQUIRED), ("state", REQUIRED), ("control", REQUIRED),
                                                   ("kwargs", None)]),
    ("callbacks", "WBLogHydraConfig.__init__", [("cfg", REQUIRED)]),
]

PROPERTIES = {
    "prompt_format.PromptFormat": ["prompt_length", "is_initialized", "init_tokens", "prompt_tokens",
                                   "prompt_token_ids"],
    "prompt_provider.TensorPromptProvider": ["is_initialized"],
    "prompt_provider.LSTMPromptProvider": ["is_initialized"],
    "prompt_embedding.PromptEmbedding": ["default_embeddings"],
    "prompt_embedding.MultiPromptEmbedding": ["default_embeddings"],
    "prompt.Prompt": ["is_initialized", "is_attached"],
    "prompt.MultiPrompt": ["is_initialized", "is_attached", "formats", "providers"],
    "preprocessing.Text2TextPreprocessor": ["is_truncation_enabled"],
}

TOP_LEVEL = ["Text2TextGenerationWithPromptPipeline", "TextGenerationWithPromptPipeline", "Text2TextPreprocessor",
             "MultiPrompt", "Prompt", "PromptFormat", "LSTMPromptProvider", "TensorPromptProvider"]

CONSTANTS = {
    "prompt_format": {"PROMPT_TOKEN": "<|P|>", "PROMPT_TOKEN_FOR_KEY": "<|[{key}]P|>",
                      "PROMPT_TOKEN_SERIAL": "<|P[{serial}]|>", "PROMPT_TOKEN_SERIAL_FOR_KEY": "<|[{key}]P[{serial}]|>",
                      "PROMPT_TOKEN_SHORT": "<P>"},
    "prompt_embedding": {"PROMPT_PROVIDER_KEY_NAME": "prompt_provider"},
    "prompt": {"PROMPT_PROVIDER_FILE_NAME": "prompt_provider.bin", "PROMPT_FILE_NAME": "prompt.json"},
}


def resolve(module: str, path: str):
    obj = importlib.import_module(f"rugpt.prompts.{module}")
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("module", "path", "expected"), SIGNATURES, ids=[f"{m}.{p}" for m, p, _ in SIGNATURES])
def test_signatures_match_ruprompts(module, path, expected):
    params = [p for p in inspect.signature(resolve(module, path)).parameters.values() if p.name not in ("self", "cls")]
    names = [p.name for p in params]
    variadic = {p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    listed = [name for name, _ in expected if name not in variadic]
    assert [n for n in names if n not in variadic][: len(listed)] == listed, names
    for name, default in expected:
        assert name in names, f"{path} lacks {name!r}: {names}"
        if default is not REQUIRED and name not in variadic:
            assert params[names.index(name)].default == default, (name, params[names.index(name)].default)
    extra = [p for p in params if p.name not in dict(expected) and p.name not in variadic]
    assert all(p.default is not REQUIRED for p in extra), f"rugpt's additions must be optional: {extra}"


@pytest.mark.parametrize(("path", "names"), PROPERTIES.items())
def test_properties_match_ruprompts(path, names):
    module, cls = path.split(".")
    for name in names:
        assert isinstance(inspect.getattr_static(resolve(module, cls), name), property), name


def test_top_level_names_and_constants():
    for name in TOP_LEVEL:
        assert getattr(rugpt.prompts, name) is not None
    for module, values in CONSTANTS.items():
        for name, value in values.items():
            assert getattr(importlib.import_module(f"rugpt.prompts.{module}"), name) == value


def test_pipeline_tasks_are_registered_by_importing_the_package():
    from transformers.pipelines import PIPELINE_REGISTRY

    tasks = PIPELINE_REGISTRY.supported_tasks
    assert tasks["text-generation-with-prompt"]["impl"] is TextGenerationWithPromptPipeline
    assert tasks["text2text-generation-with-prompt"]["impl"] is Text2TextGenerationWithPromptPipeline
    assert TextGenerationWithPromptPipeline.default_generation_parameters["max_new_tokens"] == 100


# --- ruPrompts' own tests (its repository's tests/), imports changed ---------------------------------------------


@pytest.fixture
def model(tiny_model_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def dummy_prompt():
    return Prompt(format=PromptFormat(template="<P>{text}<P>"), provider=TensorPromptProvider())


@pytest.fixture
def dummy_prompt_2():
    return Prompt(format=PromptFormat(template="<P><P>{text}<P>"), provider=TensorPromptProvider())


@pytest.fixture
def dummy_multiprompt(dummy_prompt, dummy_prompt_2):
    return MultiPrompt({"one": dummy_prompt, "two": dummy_prompt_2})


class TestPrompt:
    def test_initialize(self, dummy_prompt: Prompt, model, tokenizer):
        assert dummy_prompt.config.embedding_dim is None
        assert dummy_prompt.config.pretrained_model_name is None
        assert dummy_prompt.config.prompt_length is None
        assert not dummy_prompt.provider.is_initialized
        assert not dummy_prompt.format.is_initialized
        assert not dummy_prompt.is_initialized

        dummy_prompt.initialize(model, tokenizer)
        assert dummy_prompt.config.embedding_dim is not None
        assert dummy_prompt.config.pretrained_model_name is not None
        assert dummy_prompt.config.prompt_length is not None
        assert dummy_prompt.provider.is_initialized
        assert dummy_prompt.format.is_initialized
        assert dummy_prompt.is_initialized

    def test_attach(self, dummy_prompt: Prompt, model, tokenizer):
        assert dummy_prompt.is_initialized is False
        assert dummy_prompt.is_attached is False

        with pytest.raises(UserWarning):
            dummy_prompt.attach(model, tokenizer)

        assert dummy_prompt.is_initialized is False
        assert dummy_prompt.is_attached is False

        dummy_prompt.initialize(model, tokenizer)

        assert dummy_prompt.is_initialized is True
        assert dummy_prompt.is_attached is False

        dummy_prompt.attach(model, tokenizer)

        assert dummy_prompt.is_initialized is True
        assert dummy_prompt.is_attached is True

    def test_save_load_pretrained(self, dummy_prompt: Prompt, tmp_path, model, tokenizer):
        with pytest.raises(UserWarning):
            dummy_prompt.save_pretrained(tmp_path)
        dummy_prompt.initialize(model, tokenizer)
        dummy_prompt.save_pretrained(tmp_path)  # initialized, not attached: saved, as in ruPrompts
        loaded_prompt = Prompt.from_pretrained(tmp_path)

        assert loaded_prompt is not dummy_prompt
        assert loaded_prompt.format is not dummy_prompt.format
        assert loaded_prompt.provider is not dummy_prompt.provider

        assert loaded_prompt.format.as_dict() == dummy_prompt.format.as_dict()
        for l_param, r_param in zip(loaded_prompt.provider.parameters(), dummy_prompt.provider.parameters(),
                                    strict=True):
            assert torch.all(l_param == r_param)

    def test_as_dict(self, dummy_prompt: Prompt, model, tokenizer):
        with pytest.raises(UserWarning):
            dummy_prompt.as_dict()
        dummy_prompt.initialize(model, tokenizer)
        dummy_prompt.as_dict()

    def test_forward(self, dummy_prompt: Prompt, model, tokenizer):
        dummy_prompt.patch(model, tokenizer)
        model(**tokenizer(dummy_prompt(text="text"), return_tensors="pt"))


class TestMultiPrompt:
    def test_add_prompt(self, dummy_prompt: Prompt, dummy_prompt_2: Prompt, model, tokenizer):
        mp = MultiPrompt()
        mp.add_prompt(key="one", prompt=dummy_prompt)
        mp.initialize(model, tokenizer)
        mp.add_prompt(key="two", prompt=dummy_prompt_2)
        with pytest.raises(UserWarning):
            mp.add_prompt(key="one", prompt=dummy_prompt_2)

    def test_initialize(self, dummy_multiprompt: MultiPrompt, model, tokenizer):
        dummy_multiprompt.initialize(model, tokenizer)

    def test_attach(self, dummy_multiprompt: MultiPrompt, model, tokenizer):
        with pytest.raises(UserWarning):
            dummy_multiprompt.attach(model, tokenizer)
        dummy_multiprompt.initialize(model, tokenizer)
        dummy_multiprompt.attach(model, tokenizer)

    def test_forward(self, dummy_multiprompt: MultiPrompt, model: PreTrainedModel, tokenizer):
        dummy_multiprompt.patch(model, tokenizer)
        out1 = model(**tokenizer(dummy_multiprompt(key="one", text="text"), return_tensors="pt"))
        out2 = model(**tokenizer(dummy_multiprompt(key="two", text="text"), return_tensors="pt"))
        assert out1.logits.shape != out2.logits.shape


class TestPromptFormat:
    def test_initialize(self, tokenizer):  # xfail in ruPrompts for its third case; the first two hold
        pf = PromptFormat("<P><P>text<P>")
        pf.initialize(tokenizer)
        assert pf.compiled_template == "<|P|><|P|>text<|P|>"
        assert len(pf.init_tokens) == 0

        pf = PromptFormat("<P*5>text<P>")
        pf.initialize(tokenizer)
        assert pf.compiled_template == "<|P|><|P|><|P|><|P|><|P|>text<|P|>"
        assert len(pf.init_tokens) == 0

    def test_set_key(self, tokenizer):
        pf = PromptFormat("<P*3>{a}")
        pf.initialize(tokenizer)
        assert pf(a="a") == "<|P|>" * 3 + "a"

        pf = PromptFormat("<P*3>{a}")
        pf.set_key("one")
        pf.initialize(tokenizer)
        assert pf(a="a") == "<|[one]P|>" * 3 + "a"

        pf = PromptFormat("<P*3>{a}")
        pf.initialize(tokenizer)
        pf.set_key("one")
        assert pf(a="a") == "<|[one]P|>" * 3 + "a"

        pf.set_key(None)
        assert pf(a="a") == "<|P|>" * 3 + "a"

    def test_prompt_length(self, tokenizer):
        pf = PromptFormat("<P*10>")
        pf.initialize(tokenizer)
        assert pf.prompt_length == 10

        pf.set_key("test")
        assert pf.prompt_length == 10

    def test_call(self, tokenizer):
        pf = PromptFormat("<P>{text}<P>{text2}<P>")
        pf.initialize(tokenizer)

        assert pf(text="a", text2="b") == "<|P|>a<|P|>b<|P|>"
        assert pf({"text": "a", "text2": "b"}) == "<|P|>a<|P|>b<|P|>"
        assert pf(text="a", text2="b", return_ranges=True)[0] == "<|P|>a<|P|>b<|P|>"
        assert pf([{"text": "a", "text2": "b"}, {"text": "c", "text2": "d"}]) == [
            "<|P|>a<|P|>b<|P|>",
            "<|P|>c<|P|>d<|P|>",
        ]
        assert pf([{"text": "a", "text2": "b"}, {"text": "c", "text2": "d"}], return_ranges=True)[0] == [
            "<|P|>a<|P|>b<|P|>",
            "<|P|>c<|P|>d<|P|>",
        ]
        assert pf({"text": "a", "text2": "b", "aux": "aux"}) == "<|P|>a<|P|>b<|P|>"
        with pytest.raises(KeyError):
            pf({"text": "a"})


@pytest.fixture
def pre_format(tokenizer):
    result = PromptFormat("<P>{text}<P>")
    result.initialize(tokenizer)
    result.add_tokens(tokenizer)
    return result


class TestText2TextPreprocessor:
    def test_process(self, tokenizer, pre_format):
        p = Text2TextPreprocessor(prompt_format=pre_format, tokenizer=tokenizer, target_field="target")
        encoding = p({"text": "one", "target": "two"})
        golden_encoding = tokenizer("<|P|>one<|P|>two<|endoftext|>")
        assert encoding["input_ids"] == golden_encoding["input_ids"]

        labels_mask = np.array(encoding["labels"]) != -100
        assert np.all(np.array(encoding["labels"])[labels_mask] == np.array(golden_encoding["input_ids"])[labels_mask])

    def test_truncation(self, tokenizer, pre_format):
        p = Text2TextPreprocessor(prompt_format=pre_format, tokenizer=tokenizer, target_field="target", max_tokens=20,
                                  truncation_field="text")
        encoding = p({"text": "w" * 100, "target": ""})
        assert len(encoding["input_ids"]) == 20
        assert encoding["input_ids"][-1] == tokenizer.eos_token_id

        prompt_token_id = tokenizer.get_added_vocab()["<|P|>"]
        assert encoding["input_ids"][0] == prompt_token_id
        assert encoding["input_ids"][-2] == prompt_token_id

        encoding = p({"text": "w" * 100, "target": "ooo"})
        assert len(encoding["input_ids"]) == 20
        assert encoding["input_ids"][-1] == tokenizer.eos_token_id

        label_ids = tokenizer("ooo<|endoftext|>")["input_ids"]  # ruPrompts: [-4:] with GPT-2's 3-token "ooo"
        assert encoding["labels"][-len(label_ids):] == label_ids

    def test_call(self, tokenizer, pre_format):  # xfail in ruPrompts: a list of rows; works here
        p = Text2TextPreprocessor(prompt_format=pre_format, tokenizer=tokenizer, target_field="target")
        single = p({"text": "a", "target": "b"})
        assert p([{"text": "a", "target": "b"}, {"text": "a", "target": "b"}]) == [single, single]
        assert p({"text": ["a", "a"], "target": ["b", "b"]})["input_ids"] == [single["input_ids"]] * 2


class TestPipelines:
    def test_text_generation(self, model, tokenizer):
        pf = PromptFormat("<P*5>")
        pp = TensorPromptProvider()

        p = Prompt(format=pf, provider=pp)
        p.patch(model, tokenizer)
        torch.manual_seed(0)
        pipe = TextGenerationWithPromptPipeline(prompt=p, model=model, tokenizer=tokenizer)
        assert pipe("Text")[0]["generated_text"].startswith("Text")

        pipe = pipeline("text-generation-with-prompt", prompt=p, model=model, tokenizer=tokenizer)
        assert pipe("Text")[0]["generated_text"].startswith("Text")
        assert pipe(text="Text", do_sample=False) == pipe("Text", do_sample=False)  # as ruPrompts' docstring

    def test_text2text(self, model, tokenizer):
        prompt = Prompt(format=PromptFormat("<P>{text}<P>"), provider=TensorPromptProvider())
        prompt.patch(model, tokenizer)

        pipe = Text2TextGenerationWithPromptPipeline(prompt=prompt, model=model, tokenizer=tokenizer)
        assert isinstance(pipe("Text")[0]["generated_text"], str)
        assert pipe({"text": "Text"}, do_sample=False) == pipe("Text", do_sample=False)

        pipe = pipeline("text2text-generation-with-prompt", prompt=prompt, model=model, tokenizer=tokenizer)
        assert isinstance(pipe("Text")[0]["generated_text"], str)
        assert pipe(text="Text", do_sample=False) == pipe({"text": "Text"}, do_sample=False)

    def test_a_pipeline_built_without_a_tokenizer_loads_the_models(self, model, tokenizer):
        prompt = Prompt(format=PromptFormat("<P*2>"), provider=TensorPromptProvider())
        pipe = TextGenerationWithPromptPipeline(prompt=prompt, model=model)  # as ruPrompts' docstring example
        assert pipe("Text", max_new_tokens=2)[0]["generated_text"].startswith("Text")

    def test_generation_stops_at_id_0_as_in_ruprompts_and_at_the_tokenizers_end(self, model, tokenizer):
        from rugpt.prompts.pipelines import default_eos_token_id

        assert default_eos_token_id(tokenizer) == 0  # the bundled tokenizer: id 0 is its end of text
        tokenizer.add_special_tokens({"eos_token": "</s>"})
        assert default_eos_token_id(tokenizer) == [0, tokenizer.convert_tokens_to_ids("</s>")]


# --- the order of steps and the exceptions, as ruPrompts raised them ---------------------------------------------


def test_a_format_is_usable_once_initialized(tokenizer):
    pf = PromptFormat("<P>Ответь:</P>{text}<P*2>")
    assert (pf.is_initialized, pf.prompt_length, pf.init_tokens) == (False, None, None)
    with pytest.raises(UserWarning):
        pf(text="x")
    with pytest.raises(UserWarning):
        pf.as_dict()
    pf.initialize(tokenizer)
    ids = tokenizer("Ответь:", add_special_tokens=False)["input_ids"]
    assert pf.prompt_length == len(ids) + 2 and pf.init_tokens == dict(enumerate(ids))
    assert PromptFormat("<P*2>{text}", tokenizer=tokenizer).is_initialized
    loaded = PromptFormat(**pf.as_dict())
    assert loaded.is_initialized and loaded.init_tokens == {} and loaded(text="x") == pf(text="x")


def test_compilation_steps_as_string_functions(tokenizer):
    assert PromptFormat.build_repeated_tokens("<P*2>{a}<P*3>") == "<|P|>" * 2 + "{a}" + "<|P|>" * 3
    assert PromptFormat.build_regular_tokens("<P>{a}<P>") == "<|P|>{a}<|P|>"
    template, init = PromptFormat.build_initialized_tokens("<|P|><P>да</P>{a}", tokenizer)
    ids = tokenizer("да", add_special_tokens=False)["input_ids"]
    assert template == "<|P|>" * (1 + len(ids)) + "{a}" and init == {1 + k: i for k, i in enumerate(ids)}


def test_provider_steps_and_exceptions(model):
    embedding = model.get_input_embeddings()
    provider = TensorPromptProvider()
    assert not provider.is_initialized
    with pytest.raises(UserWarning):
        provider.save_pretrained("never.bin")
    with pytest.raises(ValueError):
        provider.initialize(prompt_length=0, embedding_dim=32, embedding=embedding, init_tokens={})
    with pytest.raises(UserWarning):
        provider.initialize(prompt_length=10**6, embedding_dim=32, embedding=embedding, init_tokens={})
    provider.initialize(prompt_length=3, embedding_dim=32, embedding=embedding, init_tokens={1: 7})
    torch.testing.assert_close(provider()[1], embedding.weight[7].detach())
    first = provider().detach().clone()
    provider.initialize(prompt_length=5, embedding_dim=32, embedding=embedding, init_tokens={})  # a no-op now
    assert torch.equal(provider().detach(), first)
    with pytest.raises(TypeError):
        TensorPromptProvider(init="zeros")
    with pytest.raises(TypeError):
        LSTMPromptProvider(hidden_dim="8")
    with pytest.raises(ValueError, match="doesn't support initialization from tokens"):
        LSTMPromptProvider().initialize(prompt_length=3, embedding_dim=32, embedding=embedding, init_tokens={0: 1})
    lstm = LSTMPromptProvider()
    lstm.initialize(prompt_length=3, embedding_dim=32, embedding=embedding, init_tokens={})
    assert (lstm.hidden_dim, lstm.input_dim) == (32, 32) and lstm().shape == (3, 32)  # -1 became the width


def test_prompt_steps_out_of_order_raise_user_warning(model, tokenizer, tmp_path):
    prompt = Prompt(format=PromptFormat("<P*2>{text}"), provider=TensorPromptProvider())
    with pytest.raises(UserWarning, match="initialized"):
        prompt.attach(model, tokenizer)
    prompt.initialize(model, tokenizer)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserWarning, match="directory"):
        prompt.save_pretrained(tmp_path / "file")
    with pytest.raises(UserWarning, match="not specified"):
        Prompt(PromptFormat("<P>"), TensorPromptProvider()).get_default_model()
    prompt.attach(model, tokenizer)
    prompt.attach(model, tokenizer)  # attaching again replaces, as ruPrompts
    assert prompt.is_attached
    prompt.detach()  # as ruPrompts: without a model only the flag changes
    assert not prompt.is_attached and isinstance(model.get_input_embeddings(), rugpt.prompts.PromptEmbedding)
    prompt.detach(model)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    prompt.save_pretrained(tmp_path / "p")
    with pytest.raises(TypeError):
        Prompt.from_pretrained(tmp_path / "p", as_safe=True)  # PromptFormatSafe: unimplemented, as in ruPrompts
    with pytest.raises(TypeError):
        PromptFormatSafe("<P>")


def test_multiprompt_steps_and_keys(model, tokenizer):
    mp = MultiPrompt({"one": Prompt(PromptFormat("<P>{text}<P>"), TensorPromptProvider())})
    with pytest.raises(UserWarning, match="initialized"):
        mp.attach(model, tokenizer)
    mp.patch(model, tokenizer)
    with pytest.raises(UserWarning, match="only once"):
        mp.attach(model, tokenizer)
    mp.add_prompt(key="two", prompt=Prompt(PromptFormat("<P*3>{text}"), TensorPromptProvider()))
    ids = tokenizer(mp(key="two", text="x"), return_tensors="pt").input_ids  # added after attach: served at once
    assert ids.shape[1] == 4 and model(ids).logits.shape[1] == 4
    assert set(mp.formats) == set(mp.providers) == {"one", "two"} and mp.is_initialized and mp.is_attached
    with pytest.raises(KeyError):
        mp(key="three", text="x")
    with pytest.raises(UsageError):
        mp(key="three", text="x")
