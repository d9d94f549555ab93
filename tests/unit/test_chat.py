import json

import pytest
from typer.testing import CliRunner

from rugpt.apps.chat import DEFAULT_SEED_DIALOGUE, Chat, ChatSettings, Speaker, Turn, parse_dialogue, read_dialogue
from rugpt.cli import app
from rugpt.errors import DataError, UsageError
from rugpt.generation import Completion, GenerationResult, GenerationSettings, cut_at_stop

runner = CliRunner()
GREEDY = GenerationSettings(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)


class ScriptedModel:
    """Replies with fixed raw continuations, cut at the stop strings as Generator does; keeps every prompt."""

    def __init__(self, loaded, replies):
        self.loaded, self.replies, self.prompts = loaded, list(replies), []

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def generate(self, prompt, settings=None):
        self.prompts.append(prompt)
        text = cut_at_stop(self.replies.pop(0), settings.stop)
        return GenerationResult(prompt, [Completion(text, [], "stop")], 0, False, "scripted")

    def stream(self, prompt, settings=None):
        text = self.generate(prompt, settings).completions[0].text
        yield from (text[i:i + 3] for i in range(0, len(text), 3))


def test_prompt_has_persona_dialogue_and_ends_with_the_assistants_label(tiny):
    settings = ChatSettings(persona="Бот — вежливый помощник.")
    model = ScriptedModel(tiny, [" Отлично!"])
    chat = Chat(model, settings)
    assert chat.send("  Как дела? ") == "Отлично!"
    assert model.prompts[0] == ("Бот — вежливый помощник.\nПользователь: Привет! Как дела?\n"
                                "Ассистент: Здравствуйте! Всё хорошо, спасибо. Чем могу помочь?\n"
                                "Пользователь: Как дела?\nАссистент:")
    assert chat.turns[-2:] == [Turn(Speaker.user, "Как дела?"), Turn(Speaker.assistant, "Отлично!")]


def test_the_chat_prompt_is_the_servers_prompt(tiny):
    from rugpt.chat_format import ChatFormat

    chat = Chat(ScriptedModel(tiny, []), ChatSettings(persona="Персона."))
    messages = [{"role": "system", "content": "Персона."}, {"role": "user", "content": "Привет! Как дела?"},
                {"role": "assistant", "content": "Здравствуйте! Всё хорошо, спасибо. Чем могу помочь?"}]
    assert chat.prompt() == ChatFormat.resolve(tiny.tokenizer).render(tiny.tokenizer, messages)


def test_a_model_template_or_a_given_one_replaces_rugpts(tiny, tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    path = tmp_path / "chat.jinja"
    path.write_text(template, encoding="utf-8")
    chat = Chat(ScriptedModel(tiny, []), ChatSettings(seed_dialogue=(), chat_template=str(path)))
    chat.turns.append(Turn(Speaker.user, "Привет"))
    assert chat.prompt() == "<user>Привет<assistant>" and chat.format.stop == ()
    with pytest.raises(UsageError, match="neither a Jinja template"):
        Chat(ScriptedModel(tiny, []), ChatSettings(chat_template="no braces here"))


def test_reply_stops_at_the_next_speaker_tag(tiny):
    model = ScriptedModel(tiny, [" Хорошо.\nПользователь: а ты кто?", " Да.\nАссистент: и ещё", " Не знаю"])
    chat = Chat(model)
    assert [chat.send("Как ты?"), chat.send("Правда?"), chat.send("Почему?")] == ["Хорошо.", "Да.", "Не знаю"]
    assert model.prompts[1].endswith("Ассистент: Хорошо.\nПользователь: Правда?\nАссистент:")


def test_history_is_trimmed_from_the_oldest_turn_to_fit_the_context(tiny):
    settings = ChatSettings(persona="Персона.", generation=GenerationSettings(max_new_tokens=80))
    model = ScriptedModel(tiny, [f" Ответ номер {i}, довольно длинный." for i in range(8)])
    chat = Chat(model, settings)
    budget = tiny.context_length - 80
    for i in range(8):
        chat.send(f"Вопрос номер {i}, тоже не самый короткий?")
        assert len(tiny.tokenizer(model.prompts[-1])["input_ids"]) <= budget
        assert model.prompts[-1].startswith("Персона.\n")
        assert model.prompts[-1].endswith(f"Пользователь: Вопрос номер {i}, тоже не самый короткий?\nАссистент:")
    assert "Привет! Как дела?" not in model.prompts[-1]  # the seed dialogue was the first to go
    assert "Вопрос номер 0," not in model.prompts[-1]
    chat.reset()
    assert chat.turns == list(DEFAULT_SEED_DIALOGUE)


def test_real_generation_is_repeatable_with_a_seed(tiny):
    settings = ChatSettings(generation=GenerationSettings(max_new_tokens=10, seed=4))
    first, second = Chat(tiny, settings), Chat(tiny, settings)
    replies = [first.send("Привет!"), first.send("Что нового?")]
    assert replies == [second.send("Привет!"), second.send("Что нового?")]
    assert all("Пользователь:" not in r and "Ассистент:" not in r for r in replies)
    assert len(first.turns) == len(DEFAULT_SEED_DIALOGUE) + 4


def test_streamed_reply_is_the_generated_reply_and_is_remembered(tiny):
    from rugpt.generation import Generator

    settings = ChatSettings(generation=GenerationSettings(max_new_tokens=12, seed=7))
    generator = Generator(tiny)
    chat, reference = Chat(generator, settings), Chat(generator, settings)
    reference.turns.append(Turn(Speaker.user, "Привет!"))
    expected = generator.generate(reference.prompt(), reference.reply_settings()).completions[0].text.strip()
    pieces = list(chat.stream("Привет!"))
    assert len(pieces) > 1 and "".join(pieces).strip() == expected
    assert chat.turns[-1] == Turn(Speaker.assistant, expected)


def test_a_stream_read_only_in_part_keeps_what_was_said(tiny):
    chat = Chat(ScriptedModel(tiny, [" Раз два три четыре"]))
    stream = chat.stream("Считай")
    first = next(stream)
    stream.close()
    assert chat.turns[-2:] == [Turn(Speaker.user, "Считай"), Turn(Speaker.assistant, first.strip())]


def test_parse_dialogue_joins_continuation_lines():
    text = "Пользователь: Привет\n\nАссистент: Здравствуй!\nРад тебя видеть.\nПользователь:Пока"
    assert parse_dialogue(text) == (
        Turn(Speaker.user, "Привет"), Turn(Speaker.assistant, "Здравствуй!\nРад тебя видеть."),
        Turn(Speaker.user, "Пока"))
    with pytest.raises(DataError, match="seed.txt:2: the first turn must start with"):
        parse_dialogue("\nПривет\nАссистент: да", source="seed.txt")
    with pytest.raises(DataError, match="no dialogue turns"):
        parse_dialogue("\n\n")


def test_read_dialogue_reports_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="cannot read seed dialogue"):
        read_dialogue(tmp_path / "none.txt")


@pytest.mark.parametrize("settings, needle", [
    (dict(generation=GenerationSettings(num_return_sequences=2)), "num_return_sequences=2"),
])
def test_invalid_settings_are_usage_errors(settings, needle):
    with pytest.raises(UsageError, match=needle):
        ChatSettings(**settings)


def test_empty_message_is_an_error(tiny):
    with pytest.raises(UsageError, match="message is empty"):
        Chat(ScriptedModel(tiny, []), ChatSettings()).send("   ")


def run(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


def test_cli_once_and_interactive(tiny_model_dir, tmp_path):
    model = ("--model", str(tiny_model_dir), "--max-new-tokens", "6", "--seed", "2")
    once = run("chat", *model, "--once", "Привет!", "--json")
    assert once.exit_code == 0, once.output
    assert json.loads(once.stdout)["message"] == "Привет!"
    seed = tmp_path / "seed.txt"
    seed.write_text("Пользователь: Здравствуй\nАссистент: Привет, человек\n", encoding="utf-8")
    talk = run("chat", *model, "--seed-dialogue", str(seed),
               stdin="Привет\n\n/reset\nКак дела?\n/exit\nне дойдёт\n")
    assert talk.exit_code == 0, talk.output
    assert talk.stdout.count("Ассистент:") == 2


@pytest.mark.parametrize("args, needle", [
    (("--once", " "), "message is empty"),
    (("--once", "Привет", "--seed-dialogue", "/nonexistent.txt"), "cannot read seed dialogue"),
    (("--once", "Привет", "--chat-template", "{% for %}"), "chat template failed"),
    (("--once", "Привет", "--temperature", "0"), "temperature=0"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_model_dir, args, needle):
    result = run("chat", "--model", str(tiny_model_dir), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
