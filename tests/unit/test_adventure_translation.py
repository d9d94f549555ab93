"""The translation bridge (gamio's design) on tiny random MarianMT models built here from a config, with a
sentencepiece model trained here on a few lines — nothing is downloaded."""

import io
import json

import pytest
from _adventure_helpers import seeds, small_adventure
from typer.testing import CliRunner

from conftest import build_tiny_model
from rugpt.apps.adventure.context import TokenCounter
from rugpt.apps.adventure.engine import Game, local_completer
from rugpt.apps.adventure.state import export_adventure
from rugpt.apps.adventure.store import AdventureStore
from rugpt.apps.adventure.translation import TranslationBridge, Translator, _names
from rugpt.apps.adventure.worldinfo import WorldCard
from rugpt.errors import ModelNotFound, UsageError
from rugpt.generation import Generator

spm = pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")  # the tokenizer built here

LINES = ["Вы открываете дверь.", "Вы идёте в корчму.", "Дракон спит в пещере.", "Ветер воет над болотом.",
         "You open the door.", "You go to the tavern.", "The dragon sleeps in a cave.", "The wind howls."]


def build_marian(folder, seed: int):
    """A 1-layer MarianMT (width 16) and its tokenizer: a sentencepiece model trained on LINES, Marian's vocab."""
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES * 4), model_writer=proto, vocab_size=80,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(proto.getvalue())
    pieces = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {"</s>": 0, "<unk>": 1}  # Marian's order: end of text, unknown, the pieces, padding last
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json")) \
        .save_pretrained(folder)
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=vocab["<pad>"],
                          eos_token_id=0, decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=0)
    MarianMTModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    """Folders of a tiny ru→en and en→ru pair."""
    base = tmp_path_factory.mktemp("marian")
    return build_marian(base / "ru-en", 0), build_marian(base / "en-ru", 1)


def dictionary_bridge() -> TranslationBridge:
    """A bridge that translates by a table, so a test can read what went where."""
    to_en = {"Вы открываете дверь.": "You open the door.", "Вы — рыцарь.": "You are a knight.",
             "Лес у реки.": "A forest by the river.", "Вы стоите у старого замка.": "You stand at an old castle.",
             "[Примечание автора: Тон мрачный.]": "[Author's note: The tone is grim.]",
             "Дверь скрипит.": "The door creaks.", "Дракон спит в пещере.": "The dragon sleeps in a cave.",
             "Вы ждёте дракона.": "You wait for the dragon.", "Дверь заперта.": "The door is locked."}
    to_ru = {english: russian for russian, english in to_en.items()}
    return TranslationBridge(lambda text: to_en.get(text, f"EN<{text}>"), lambda text: to_ru.get(text, f"RU<{text}>"),
                             "ru-en")


def capture(output: str, prompts: list[str]):
    def complete(prompt, settings):
        prompts.append(prompt)
        return output

    return complete


@pytest.fixture(scope="module")
def model_512(tmp_path_factory):
    """A tiny random GPT with a 512-token context: English counted by a Russian tokenizer takes many tokens."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-512"), n_positions=512)


@pytest.fixture(scope="module")
def tiny512(model_512):
    from rugpt.models import load

    return load(str(model_512), device="cpu")


@pytest.fixture
def bridged(tiny512, tmp_path):
    store = AdventureStore(tmp_path / "games.sqlite3")
    adventure = small_adventure()
    store.create(adventure)
    yield Game(adventure, TokenCounter(tiny512.tokenizer), tiny512.context_length, store, seeds(),
               dictionary_bridge())
    store.close()


def test_the_action_goes_in_english_and_the_story_comes_back_in_russian(bridged):
    prompts: list[str] = []
    turn = bridged.act("do", "я открываю дверь", capture("The door creaks. And th", prompts))
    assert (turn.action, turn.model_action) == ("Вы открываете дверь.", "You open the door.")  # rewritten, then sent
    assert (turn.output, turn.model_output) == ("Дверь скрипит.", "The door creaks.")  # cut, then translated
    assert prompts[0].split("\n")[:2] == ["You are a knight.", "A forest by the river."]
    assert prompts[0].rstrip("\n").endswith("You stand at an old castle.\nYou open the door.")
    assert "[Author's note: The tone is grim.]" in prompts[0] and "Вы" not in prompts[0]
    bridged.act("continue", "", capture("The door is locked.", prompts))
    assert "You open the door.\nThe door creaks." in prompts[1]  # the model reads its own side of the story


def test_world_info_fires_on_the_players_words_and_enters_in_english(bridged):
    prompts: list[str] = []
    bridged.act("do", "я жду дракона", capture("Nothing.", prompts))
    assert "[The dragon sleeps in a cave.]" in prompts[0]  # the key «дракон» matched «дракона» by lemma


def test_both_sides_are_saved_and_retry_edit_keep_them_in_step(bridged):
    bridged.act("do", "я открываю дверь", capture("The door creaks.", []))
    again = bridged.retry(capture("The door is locked.", []))
    assert (again.model_action, again.model_output, again.output) == (
        "You open the door.", "The door is locked.", "Дверь заперта.")
    edited = bridged.edit(0, output="Дверь скрипит.")
    assert edited.model_output == "The door creaks."
    saved = bridged.store.load_by_id(bridged.adventure.id)
    assert saved.turns[0].model_output == "The door creaks." and saved.turns[0].output == "Дверь скрипит."
    assert saved.translations["Вы — рыцарь."] == "You are a knight."  # fixed texts are translated once, kept


def test_a_game_played_without_the_bridge_goes_on_through_it(tiny512):
    adventure = small_adventure()
    plain = Game(adventure, TokenCounter(tiny512.tokenizer), tiny512.context_length, seeds=seeds())
    plain.act("do", "я открываю дверь", capture("Дверь скрипит.", []))
    prompts: list[str] = []
    Game(adventure, plain.count, plain.context_length, seeds=seeds(), bridge=dictionary_bridge()).act(
        "continue", "", capture("Silence.", prompts))
    assert "You open the door.\nThe door creaks." in prompts[0]  # the old turn translated on the way


def test_marian_translators_load_from_folders_and_translate(marian):
    ru_en, _ = marian
    translator = Translator(str(ru_en))
    one = translator("Вы открываете дверь.")
    assert isinstance(one, str) and one and one == translator("Вы открываете дверь.")  # deterministic
    two_lines, empty = translator.translate(["Дракон спит.\nВетер воет.", "  "])
    assert two_lines.count("\n") == 1 and empty == "  ".strip()


def test_the_bridge_on_tiny_marian_models_and_a_tiny_gpt(marian, tiny512):
    ru_en, en_ru = marian
    bridge = TranslationBridge.load(f"{ru_en},{en_ru}")
    adventure = small_adventure(max_new_tokens=8)
    game = Game(adventure, TokenCounter(tiny512.tokenizer), tiny512.context_length, seeds=seeds(), bridge=bridge)
    prompts: list[str] = []
    generator = local_completer(Generator(tiny512))
    turn = game.act("do", "я открываю дверь", lambda p, s: prompts.append(p) or generator(p, s))
    assert turn.action == "Вы открываете дверь." and turn.model_action == bridge.to_model("Вы открываете дверь.")
    assert prompts[0].rstrip("\n").endswith(turn.model_action)
    assert turn.output == (bridge.to_player(turn.model_output) if turn.model_output else "")
    data = export_adventure(adventure)
    assert data["turns"][0]["model_action"] == turn.model_action and data["translations"]


def test_play_translates_in_the_terminal(marian, model_512, tmp_path):
    from rugpt.cli import app

    ru_en, en_ru = marian
    model = model_512
    saved = tmp_path / "test.json"
    saved.write_text(json.dumps(export_adventure(small_adventure()), ensure_ascii=False))
    result = CliRunner().invoke(app, ["play", "--import", str(saved), "-m", str(model), "--db",
                                      str(tmp_path / "g.sqlite3"), "--translate", f"{ru_en},{en_ru}"],
                                input="я открываю дверь\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "1. Вы открываете дверь." in result.output
    stored = AdventureStore(tmp_path / "g.sqlite3")
    turn = stored.load_by_id(1).turns[0]
    assert turn.model_action and turn.action == "Вы открываете дверь."
    stored.close()


def test_a_missing_translator_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as caught:
        TranslationBridge.load("xx-yy")
    message = str(caught.value)
    assert "Helsinki-NLP/opus-mt-xx-yy" in message and "\n" not in message and message.count(". ") == 0


def test_translate_names_a_pair_or_two_models():
    assert _names("ru-en") == ("Helsinki-NLP/opus-mt-ru-en", "Helsinki-NLP/opus-mt-en-ru")
    assert _names("de-en") == ("Helsinki-NLP/opus-mt-de-en", "Helsinki-NLP/opus-mt-en-de")
    assert _names("/m/a, /m/b") == ("/m/a", "/m/b")
    with pytest.raises(UsageError, match="language pair such as ru-en"):
        _names("russian")


def test_cards_survive_the_bridge_unchanged(bridged):
    bridged.update(cards=[{"keys": ["дверь"], "text": "Дверь заперта.", "order": 5}])
    prompts: list[str] = []
    bridged.act("do", "я открываю дверь", capture("The door creaks.", prompts))
    assert "[The door is locked.]" in prompts[0]
    assert bridged.adventure.cards == [WorldCard(("дверь",), "Дверь заперта.", order=5)]
