"""The community's files in and out: Tavern cards (JSON, PNG, .charx), SillyTavern World Info, KoboldAI saves,
AI Dungeon story cards. Every file is built here to its published spec; every format goes import → export → import."""

import base64
import io
import json
import zipfile

import pytest
from _adventure_helpers import (
    b64_json,
    card_v2,
    card_v3,
    kobold_save,
    png_with_text,
    small_adventure,
    story_cards,
    world_info,
)

from rugpt.apps.adventure import formats
from rugpt.apps.adventure.formats import Format, png
from rugpt.apps.adventure.state import ActionKind, Turn
from rugpt.apps.adventure.worldinfo import Position, SelectiveLogic
from rugpt.errors import DataError, UsageError


def read(document, name: str = "file.json", **kwargs) -> formats.Imported:
    data = document if isinstance(document, bytes) else json.dumps(document, ensure_ascii=False).encode()
    return formats.read_bytes(data, name, **kwargs)


def same(first, second) -> None:
    """Two adventures are the same: header, story and turns (not the moment a turn was made)."""
    assert first.header() == second.header()
    assert first.length == second.length
    strip = [{**t.to_dict(), "created": 0} for t in first.turns]
    assert strip == [{**t.to_dict(), "created": 0} for t in second.turns]


def chunk_json(data: bytes, keyword: str) -> dict:
    return json.loads(base64.b64decode(png.read_text(data)[keyword]))


# --- Tavern cards


def test_a_v2_card_becomes_the_beginning_of_an_adventure():
    adventure = read(card_v2(), "miron.json").adventure
    assert (adventure.title, adventure.character) == ("Мирон", "Мирон")
    assert adventure.memory == "{{char}} — корчмарь «Хромого гуся»."
    assert (adventure.personality, adventure.world) == ("хитрый, жадный", "Корчма у дороги, ночь.")
    assert adventure.opening == "Мирон кивает {{user}}: «Чего надо?»"
    assert adventure.greetings == ["Мирон кивает {{user}}: «Чего надо?»", "Мирон молча протирает кружку."]
    assert adventure.system_prompt == "Пиши по-русски." and adventure.post_history == "Отвечай коротко."
    assert adventure.examples.startswith("<START>")
    snake, miron, always = adventure.cards
    assert snake.keys == ("змей",) and snake.secondary_keys == ("огонь", "факел") and snake.selective
    assert snake.logic is SelectiveLogic.and_all  # SillyTavern's extensions.selectiveLogic 3
    assert (snake.order, snake.priority, snake.position, snake.name) == (20, 5, Position.after_char, "Змей")
    assert snake.case_sensitive is False and snake.comment == "главный враг"
    assert miron.order == 10 and not miron.constant
    assert always.constant and always.keys == () and always.position is Position.before_char
    settings = adventure.settings
    assert (settings.scan_turns, settings.lore_tokens, settings.recursive_lore) == (2, 400, False)


def test_the_chosen_greeting_opens_the_story():
    assert read(card_v2(), greeting=1).adventure.opening == "Мирон молча протирает кружку."
    with pytest.raises(DataError, match="greeting 2 does not exist"):
        read(card_v2(), greeting=2)


def test_a_v1_card_reads_too():
    v1 = {"name": "Ярина", "description": "Ведьма.", "personality": "", "scenario": "Болото.",
          "first_mes": "Ярина смеётся.", "mes_example": ""}
    adventure = read(v1).adventure
    assert (adventure.title, adventure.world, adventure.opening) == ("Ярина", "Болото.", "Ярина смеётся.")
    card = json.loads(formats.export_bytes(adventure, Format.tavern))
    assert card["spec"] == "chara_card_v2" and card["data"]["name"] == "Ярина" and card["name"] == "Ярина"


@pytest.mark.parametrize("fmt", [Format.tavern, Format.png, Format.charx])
def test_card_round_trip_keeps_the_adventure_and_every_unknown_field(fmt):
    first = read(card_v2(), "miron.json")
    exported = formats.export_bytes(first.adventure, fmt)
    second = formats.read_bytes(exported, f"miron.{fmt.value}")
    same(first.adventure, second.adventure)
    if fmt is Format.png:
        card = chunk_json(exported, "chara")
        assert chunk_json(exported, "ccv3")["spec"] == "chara_card_v3"  # writers put both chunks
    elif fmt is Format.charx:
        card = json.loads(zipfile.ZipFile(io.BytesIO(exported)).read("card.json"))
    else:
        card = json.loads(exported)
    original = card_v2()
    assert card["x_unknown_top"] == "top" and card["data"]["x_unknown_data_field"] == 42
    assert card["data"]["extensions"] == original["data"]["extensions"]
    book = card["data"]["character_book"]
    assert book["extensions"] == {"x_book": {"kept": True}} and book["name"] == "Книга Мирона"
    assert book["description"] == "лор корчмы"
    entry = book["entries"][0]
    assert entry["x_unknown_entry_field"] == "stays" and entry["id"] == 1
    assert entry["extensions"] == {"selectiveLogic": 3, "x_entry": [1, 2]}
    for field in ("creator_notes", "tags", "creator", "character_version"):
        assert card["data"][field] == original["data"][field]


def test_a_png_card_is_read_from_its_chara_chunk_and_ccv3_wins():
    data = png_with_text({"chara": b64_json(card_v2()), "ccv3": b64_json(card_v3(name="Мирон Третий"))})
    imported = formats.read_bytes(data, "miron.png")
    assert imported.format is Format.png and imported.adventure.title == "Мирон Третий"
    assert imported.adventure.character == "Мироша"  # V3: the nickname stands for {{char}}
    only_v2 = formats.read_bytes(png_with_text({"chara": b64_json(card_v2())}), "miron.png")
    assert only_v2.adventure.title == "Мирон"


def test_a_png_export_keeps_the_picture_of_the_card():
    data = png_with_text({"chara": b64_json(card_v2()), "Comment": "a picture"}, width=3, height=5)
    exported = formats.export_bytes(read(data, "miron.png").adventure, Format.png)
    kinds = [kind for kind, _ in png.chunks(exported)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IDAT") == 1
    header = dict(png.chunks(exported))[b"IHDR"]
    assert int.from_bytes(header[:4], "big") == 3 and int.from_bytes(header[4:8], "big") == 5
    assert png.read_text(exported)["Comment"] == "a picture"


def test_v3_card_round_trip_as_charx_keeps_its_assets():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("card.json", json.dumps(card_v3(), ensure_ascii=False))
        zf.writestr("assets/icon/images/main.png", b"picture bytes")
    first = formats.read_bytes(archive.getvalue(), "miron.charx")
    assert first.format is Format.charx and first.adventure.cards[0].logic is SelectiveLogic.and_all
    exported = formats.export_bytes(first.adventure, Format.charx)
    with zipfile.ZipFile(io.BytesIO(exported)) as zf:
        assert zf.read("assets/icon/images/main.png") == b"picture bytes"
        card = json.loads(zf.read("card.json"))
    assert card["spec"] == "chara_card_v3" and card["spec_version"] == "3.0"
    assert card["data"]["assets"] == card_v3()["data"]["assets"] and card["data"]["creation_date"] == 1700000000
    assert all(entry["use_regex"] is False for entry in card["data"]["character_book"]["entries"])
    same(first.adventure, formats.read_bytes(exported, "miron.charx").adventure)


def test_a_scenario_becomes_a_card_with_its_cards_as_a_book():
    adventure = small_adventure()
    card = json.loads(formats.export_bytes(adventure, Format.tavern))
    data = card["data"]
    assert card["spec"] == "chara_card_v2" and data["name"] == "Тест" and data["first_mes"] == adventure.opening
    assert data["description"] == adventure.memory and data["scenario"] == adventure.world
    assert data["extensions"]["depth_prompt"]["prompt"] == adventure.authors_note
    assert [e["keys"] for e in data["character_book"]["entries"]] == [["дракон"], ["Хромой гусь"]]
    back = read(card).adventure
    assert back.cards == adventure.cards and back.authors_note == adventure.authors_note


# --- SillyTavern World Info, AI Dungeon story cards: lorebooks


def test_world_info_becomes_a_lorebook():
    imported = read(world_info(), "bolota.json")
    assert imported.lore_only and imported.format is Format.sillytavern
    (book,) = imported.adventure.lorebooks
    assert book.name == "bolota" and [c.comment for c in book.cards] == ["Болото", "Мост", "Погода"]
    swamp, bridge, weather = book.cards
    assert swamp.keys == ("болото", "топь") and swamp.secondary_keys == ("ночь",) and swamp.position.value == \
        "before_char"
    assert bridge.logic is SelectiveLogic.not_any and bridge.order == 50
    assert bridge.position is Position.unspecified and bridge.extra["sillytavern"]["position"] == 4
    assert weather.constant and weather.position is Position.after_char


def test_world_info_round_trip_keeps_uids_and_unknown_fields():
    first = read(world_info(), "bolota.json")
    exported = json.loads(formats.export_bytes(first.adventure, Format.sillytavern))
    assert set(exported["entries"]) == {"0", "7", "3"} and exported["originalData"] == {"name": "Болота"}
    assert exported["entries"]["7"]["depth"] == 2 and exported["entries"]["7"]["position"] == 4
    assert exported["entries"]["0"]["displayIndex"] == 0 and exported["entries"]["0"]["probability"] == 100
    same(first.adventure, read(exported, "bolota.json").adventure)


def test_story_cards_round_trip():
    first = read(story_cards(), "knyaz.json")
    assert first.lore_only and first.format is Format.aidungeon
    (book,) = first.adventure.lorebooks
    assert book.cards[0].keys == ("князь", "Всеслав") and book.cards[0].name == "Всеслав"
    assert book.cards[0].comment == "правитель"  # an author's note, never in the context
    exported = json.loads(formats.export_bytes(first.adventure, Format.aidungeon))
    assert exported[0]["keys"] == "князь,Всеслав" and exported[1]["x_aid_field"] == 1
    assert exported[0]["type"] == "character"
    same(first.adventure, read(exported, "knyaz.json").adventure)


def test_several_lorebooks_join_one_adventure():
    adventure = small_adventure()
    books = formats.with_lorebooks(adventure, [read(world_info(), "bolota.json"), read(story_cards(), "aid.json")])
    assert [b.name for b in books] == ["bolota", "aid"]
    adventure.lorebooks = books
    assert len(adventure.all_cards()) == 2 + 3 + 2
    with pytest.raises(UsageError, match="not a lorebook"):
        formats.with_lorebooks(adventure, [read(card_v2(), "miron.json")])


# --- KoboldAI saves


def test_a_kobold_save_keeps_the_whole_story():
    adventure = read(kobold_save(), "gorod.json").adventure
    assert adventure.opening == "Вы стоите у ворот старого города." and adventure.memory == "Вы — наёмник Ратибор."
    assert adventure.authors_note == "Тон мрачный." and adventure.note_template == "[Заметка: <|>]"
    assert [(t.action, t.output) for t in adventure.story] == [
        ("Вы входите в ворота.", "Стражник смотрит на вас."), ("", "Начинается дождь."),
        ("Вы идёте к корчме.", "Корчма закрыта.")]
    assert adventure.story[1].kind is ActionKind.continue_
    assert [c.keys for c in adventure.cards] == [("корчма", "таверна")]
    (enemies,) = adventure.lorebooks
    assert enemies.name == "Враги" and enemies.cards[0].secondary_keys == ("ночь",) and enemies.cards[1].constant


def test_kobold_round_trip_and_the_save_kobold_opens():
    first = read(kobold_save(), "gorod.json")
    exported = json.loads(formats.export_bytes(first.adventure, Format.koboldai))
    for field in ("gamestarted", "prompt", "memory", "authorsnote", "anotetemplate", "actions", "actions_metadata",
                  "worldinfo", "wifolders_d", "wifolders_l"):
        assert field in exported
    assert all(isinstance(a, str) for a in exported["actions"]) and exported["x_kobold_field"] == {"kept": True}
    assert exported["prompt"] + "".join(exported["actions"]) == (
        "Вы стоите у ворот старого города.\n\n> Вы входите в ворота.\nСтражник смотрит на вас.\nНачинается дождь."
        "\n\n> Вы идёте к корчме.\nКорчма закрыта.")
    assert exported["worldinfo"][1] == {"key": "змей", "keysecondary": "ночь", "content": "Змей прилетает ночью.",
                                        "comment": "враг", "folder": 5, "selective": True, "constant": False}
    assert exported["wifolders_d"] == {"5": {"collapsed": False, "name": "Враги"}} and exported["wifolders_l"] == [5]
    same(first.adventure, read(exported, "gorod.json").adventure)


def test_a_played_adventure_exports_to_kobold_and_back():
    adventure = small_adventure()
    adventure.turns = [Turn(ActionKind.do, "я иду", "Вы идёте.", "Лес шумит.", 1, {}),
                       Turn(ActionKind.continue_, "", "", "Темнеет.", 2, {})]
    adventure.length = 2
    save = json.loads(formats.export_bytes(adventure, Format.koboldai))
    assert save["memory"] == "Вы — рыцарь.\nЛес у реки."  # everything always at the top is KoboldAI's memory
    back = read(save, "test.json").adventure
    assert [t.block() for t in back.story] == [t.block() for t in adventure.story]
    assert back.cards == [c.__class__(c.keys, c.text, extra=back.cards[i].extra) for i, c in enumerate(adventure.cards)]


def test_rugpt_json_round_trip_keeps_the_origin_for_a_later_card_export():
    first = formats.read_bytes(png_with_text({"chara": b64_json(card_v2())}), "miron.png").adventure
    again = read(json.loads(formats.export_bytes(first, Format.rugpt))).adventure
    assert again.origin.format == "png" and again.origin.blob == first.origin.blob
    assert chunk_json(formats.export_bytes(again, Format.png), "chara")["x_unknown_top"] == "top"


# --- bad files: one clear message each


@pytest.mark.parametrize("data, name, message", [
    (png_with_text({"Comment": "just a picture"}), "face.png", "a PNG without a character card"),
    (png_with_text({"chara": base64.b64encode(b"not json at all").decode()}), "x.png", "is not base64 of JSON"),
    (png_with_text({"chara": "%%% not base64 %%%"}), "x.png", "is not base64 of JSON"),
    (png_with_text({"chara": b64_json({"hello": 1})}), "x.png", "not a character card"),
    (png_with_text({"chara": b64_json(card_v2())})[:-20], "cut.png", "truncated PNG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0\0\0\x0dIHDR" + b"\0" * 17, "bad.png", "fails its CRC"),
    (b"PK\x03\x04 broken zip", "x.charx", "cannot read x.charx"),
    (b"\xff\xfe garbage", "x.json", "neither a PNG or .charx character card nor JSON"),
    (b'{"hello": "world"}', "x.json", "not a file rugpt imports"),
    (json.dumps({"entries": {"0": {"key": [], "content": "без ключей"}}}).encode(), "w.json", "entry 0.*has no keys"),
    (json.dumps([{"keys": "", "value": "без ключей"}]).encode(), "aid.json", "story card 0.*has no keys"),
    (json.dumps({**kobold_save(), "worldinfo": [{"key": "", "content": "x"}]}).encode(), "k.json", "has no keys"),
    (json.dumps(card_v2(character_book={"entries": [{"keys": [], "content": "x", "extensions": {}}]})).encode(),
     "c.json", "character_book entry 0.*has no keys"),
    (json.dumps({**kobold_save(), "actions": "not a list"}).encode(), "k.json", "'actions' must be a list"),
])
def test_bad_files_get_one_clear_message(data, name, message):
    with pytest.raises(DataError, match=message) as caught:
        formats.read_bytes(data, name)
    assert "\n" not in str(caught.value)


def test_a_50_megabyte_card_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(50 * 2**20)
    with pytest.raises(DataError, match=r"huge.png has 52,428,800 bytes; the most rugpt imports is 20,971,520"):
        formats.read_file(huge)
    with pytest.raises(DataError, match="bytes; the most rugpt imports is"):
        formats.read_bytes(b"\0" * (formats.MAX_FILE_BYTES + 1), "huge.png")


def test_a_compressed_text_chunk_cannot_inflate_without_bound():
    import struct
    import zlib

    body = b"chara\0" + b"\x01\x00" + b"\0\0" + zlib.compress(b"A" * (png.MAX_TEXT + 10))
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    data = png.plain_picture(1, 1)
    data = data[:-12] + chunk + data[-12:]
    with pytest.raises(DataError, match="inflates to more than"):
        png.read_text(data)


def test_export_format_follows_the_extension_or_is_named():
    assert formats.format_for_path("a.png") is Format.png and formats.format_for_path("a.charx") is Format.charx
    assert formats.format_for_path("a.json") is Format.rugpt
    assert formats.format_for_path("a.json", "koboldai") is Format.koboldai
    with pytest.raises(UsageError, match="cannot tell the format"):
        formats.format_for_path("a.txt")
    with pytest.raises(UsageError, match="format='word' is unknown"):
        formats.format_for_path("a.json", "word")
