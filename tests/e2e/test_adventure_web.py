"""The /play page on `rugpt serve`: a restart keeps the story, players are kept apart, Chromium plays and reloads.

Each test runs a live uvicorn server on 127.0.0.1 (a free port) with a tiny random model; turns are
decoded by the server's batching scheduler.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from _serve_helpers import CHROMIUM, chromium_page  # noqa: E402
from _serve_helpers import live_server as serve_live  # noqa: E402
from conftest import build_tiny_model  # noqa: E402
from rugpt.apps.adventure.store import AdventureStore  # noqa: E402
from rugpt.apps.adventure.web import TOKEN_HEADER, create_play_router  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny random model with a 512-token context (so the built-in scenarios fit), loaded once."""
    from rugpt.models import load

    return load(str(build_tiny_model(tmp_path_factory.mktemp("tiny-512"), n_positions=512)), device="cpu")


@contextmanager
def live_server(loaded, db: Path) -> Iterator[str]:
    """`rugpt serve`'s app with the /play router, served by uvicorn in a thread; yields its base URL."""
    from rugpt.serve import ServerSettings, create_app

    store = AdventureStore(db)
    app = create_app(ServerSettings(model=loaded.source, max_batch=4), loaded=loaded,
                     routers=[create_play_router(store)])
    try:
        with serve_live(app) as url:
            yield url
    finally:
        store.close()


def new_adventure(client: httpx.Client, scenario: str = "fantasy") -> str:
    response = client.post("/play/api/adventures", json={"scenario": scenario})
    assert response.status_code == 201, response.text
    return response.json()["token"]


def act(client: httpx.Client, token: str, text: str, kind: str = "do") -> dict:
    response = client.post("/play/api/adventure/act", json={"kind": kind, "text": text}, headers={TOKEN_HEADER: token})
    assert response.status_code == 200, response.text
    return response.json()


def state(client: httpx.Client, token: str) -> httpx.Response:
    return client.get("/play/api/adventure", headers={TOKEN_HEADER: token})


def test_story_survives_a_server_restart(loaded, tmp_path):
    db = tmp_path / "games.sqlite3"
    with live_server(loaded, db) as url, httpx.Client(base_url=url, timeout=60) as client:
        token = new_adventure(client)
        act(client, token, "я иду в корчму")
        act(client, token, "кто здесь?", kind="say")
        before = state(client, token).json()
    with live_server(loaded, db) as url, httpx.Client(base_url=url, timeout=60) as client:
        after = state(client, token).json()
        assert after == before
        assert [t["action"] for t in after["turns"]] == ["Вы идёте в корчму.", "Вы говорите: «Кто здесь?»"]
        undone = client.post("/play/api/adventure/undo", headers={TOKEN_HEADER: token}).json()
        assert len(undone["turns"]) == 1 and undone["can_redo"]


def test_two_players_are_kept_apart(loaded, tmp_path):
    with live_server(loaded, tmp_path / "games.sqlite3") as url, httpx.Client(base_url=url, timeout=60) as client:
        alice, bob = new_adventure(client, "space"), new_adventure(client, "detective")
        moves = {alice: ["я осматриваюсь", "я иду к шлюзу", "я зову Вегу"],
                 bob: ["я осматриваю стол", "я нюхаю чашку", "я зову дворника"]}

        def play(token: str) -> list[str]:
            return [act(client, token, text)["turns"][-1]["action"] for text in moves[token]]

        with ThreadPoolExecutor(2) as pool:  # both play at once; their turns share the server's batches
            played = dict(zip(moves, pool.map(play, moves), strict=True))
        for token, actions in played.items():
            story = state(client, token).json()
            assert [t["action"] for t in story["turns"]] == actions
        assert played[alice][0] == "Вы осматриваетесь." and played[bob][0] == "Вы осматриваете стол."
        assert state(client, alice).json()["title"] == "Станция «Предел»"
        for wrong in ("", bob[:-2] + "xx", "x" * 500):
            assert state(client, wrong).status_code == 404
            refused = client.post("/play/api/adventure/undo", headers={TOKEN_HEADER: wrong} if wrong else {})
            assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found_error"
        assert len(state(client, bob).json()["turns"]) == 3  # nothing of bob's was touched
        prefilled = re.search(r"^rugpt_prompt_tokens_total (\S+)$", client.get("/metrics").text, re.MULTILINE)
        assert float(prefilled.group(1)) > 0  # the turns were decoded by the server's scheduler
        bad = client.post("/play/api/adventures", json={"scenario": "../../etc/passwd"})
        assert bad.status_code == 400


def test_export_import_and_errors_over_http(loaded, tmp_path):
    with live_server(loaded, tmp_path / "games.sqlite3") as url, httpx.Client(base_url=url, timeout=60) as client:
        token = new_adventure(client, "postapocalypse")
        act(client, token, "я беру обрез")
        exported = client.get("/play/api/adventure/export", headers={TOKEN_HEADER: token}).json()
        copy = client.post("/play/api/adventures/import", json=exported)
        assert copy.status_code == 201 and copy.json()["token"] != token
        assert copy.json()["adventure"]["turns"][0]["action"] == "Вы берёте обрез."
        empty = client.post("/play/api/adventure/act", json={"kind": "do", "text": " "}, headers={TOKEN_HEADER: token})
        assert empty.status_code == 400 and "needs some text" in empty.json()["error"]["message"]
        assert client.post("/play/api/adventures/import", json={"format": "x"}).status_code == 400
        edited = client.post("/play/api/adventure/edit", json={"index": 0, "output": "Патронов пять."},
                             headers={TOKEN_HEADER: token}).json()
        assert edited["turns"][0]["output"] == "Патронов пять."
        patched = client.patch("/play/api/adventure", json={"memory": "Вы — Лис."}, headers={TOKEN_HEADER: token})
        assert patched.json()["memory"] == "Вы — Лис."
        context = client.get("/play/api/adventure/context", headers={TOKEN_HEADER: token}).json()
        assert context["text"].startswith("Вы — Лис.") and context["tokens"] <= context["budget"]


def test_router_on_any_app_with_a_local_generator(loaded, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from rugpt.apps.adventure.web import PlayBackend
    from rugpt.generation import Generator

    app = FastAPI()
    store = AdventureStore(tmp_path / "games.sqlite3")
    app.include_router(create_play_router(store, PlayBackend.from_generator(Generator(loaded))))
    with TestClient(app) as client:
        token = new_adventure(client, "space")
        assert act(client, token, "я иду к реактору")["turns"][0]["action"] == "Вы идёте к реактору."
        assert client.get("/play").headers["content-type"].startswith("text/html")
    store.close()


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_chromium_plays_three_turns_and_finds_them_after_reload(loaded, tmp_path):
    pytest.importorskip("playwright.sync_api")
    actions = [("do", "я открываю дверь", "Вы открываете дверь."),
               ("say", "есть кто живой?", "Вы говорите: «Есть кто живой?»"),
               ("do", "я беру меч", "Вы берёте меч.")]
    with live_server(loaded, tmp_path / "games.sqlite3") as url, chromium_page(f"{url}/play", 30_000) as page:
        page.click("button[data-scenario=fantasy]")
        page.wait_for_selector("#game:not(.hidden)")
        for number, (kind, typed, _) in enumerate(actions, start=1):
            page.select_option("#action-kind", kind)
            page.fill("#action-text", typed)
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('#story .turn').length === {number}")
            page.wait_for_selector("#send:not([disabled])")
        page.reload()
        page.wait_for_function("document.querySelectorAll('#story .turn').length === 3")
        shown = page.locator("#story .turn-action").all_text_contents()
        assert shown == [expected for _, _, expected in actions]
        assert "Вышеград" in page.locator("#story .opening").text_content()


# --- the community's files on /play


def card_png(tmp_path: Path) -> Path:
    from unit._adventure_helpers import b64_json, card_v2, png_with_text

    path = tmp_path / "miron.png"
    path.write_bytes(png_with_text({"chara": b64_json(card_v2())}))
    return path


def upload(client, path: str, data: bytes, filename: str, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream", **({TOKEN_HEADER: token} if token else {})}
    return client.post(path, params={"filename": filename}, content=data, headers=headers)


def test_cards_saves_and_lorebooks_over_http(loaded, tmp_path, monkeypatch):
    import json

    from rugpt.apps.adventure import formats
    from unit._adventure_helpers import kobold_save, world_info

    with live_server(loaded, tmp_path / "games.sqlite3") as url, httpx.Client(base_url=url, timeout=60) as client:
        created = upload(client, "/play/api/adventures/import", card_png(tmp_path).read_bytes(), "miron.png")
        assert created.status_code == 201, created.text
        token, adventure = created.json()["token"], created.json()["adventure"]
        assert adventure["title"] == "Мирон" and adventure["world"] == "Корчма у дороги, ночь."
        act(client, token, "я сажусь за стол")
        for fmt in formats.Format:
            exported = client.get("/play/api/adventure/export", params={"format": fmt.value},
                                  headers={TOKEN_HEADER: token})
            assert exported.status_code == 200, (fmt, exported.text)
            back = formats.read_bytes(exported.content, f"miron{formats.file_suffix(fmt)}")
            assert back.format is fmt
            if fmt in (formats.Format.png, formats.Format.tavern, formats.Format.charx):
                assert back.adventure.origin.document["x_unknown_top"] == "top"
        png = client.get("/play/api/adventure/export", params={"format": "png"}, headers={TOKEN_HEADER: token})
        assert png.headers["content-type"] == "image/png" and "attachment" in png.headers["content-disposition"]
        lore = upload(client, "/play/api/adventure/lorebooks", json.dumps(world_info()).encode(), "bolota.json", token)
        assert lore.json()["lorebooks"] == [{"name": "bolota", "entries": 3}]
        kobold = upload(client, "/play/api/adventures/import", json.dumps(kobold_save()).encode(), "gorod.json")
        assert [t["number"] for t in kobold.json()["adventure"]["turns"]] == [1, 2, 3]
        for data, name, message in [
            (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "face.png", "PNG"),
            (json.dumps(world_info()).encode(), "bolota.json", "is a lorebook"),
            (b"", "empty.json", "the upload is empty"),
        ]:
            refused = upload(client, "/play/api/adventures/import", data, name)
            assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
        refused = upload(client, "/play/api/adventure/lorebooks", card_png(tmp_path).read_bytes(), "m.png", token)
        assert refused.status_code == 400 and "not a lorebook" in refused.json()["error"]["message"]
        monkeypatch.setattr(formats, "MAX_FILE_BYTES", 1000)
        big = upload(client, "/play/api/adventures/import", b"{" + b" " * 5000 + b"}", "big.json")
        assert big.status_code == 400 and "the most rugpt imports is 1,000 bytes" in big.json()["error"]["message"]
        assert len(state(client, token).json()["turns"]) == 1  # nothing of the game changed


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_chromium_uploads_a_png_card_and_plays_a_turn(loaded, tmp_path):
    pytest.importorskip("playwright.sync_api")
    from unit._adventure_helpers import png_with_text

    card = card_png(tmp_path)
    face = tmp_path / "face.png"
    face.write_bytes(png_with_text({"Comment": "only a face"}))
    with live_server(loaded, tmp_path / "games.sqlite3") as url, chromium_page(f"{url}/play", 30_000) as page:
        page.wait_for_selector("button[data-scenario=fantasy]")
        page.set_input_files("#import-file", str(face))
        page.wait_for_function("document.getElementById('notice').textContent.includes('without a character card')")
        page.set_input_files("#import-file", str(card))
        page.wait_for_selector("#game:not(.hidden)")
        assert page.locator("#title").text_content() == "Мирон"
        assert "Мирон кивает" in page.locator("#story .opening").text_content()
        page.fill("#action-text", "я открываю дверь")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('#story .turn').length === 1")
        assert page.locator("#story .turn-action").all_text_contents() == ["Вы открываете дверь."]
        assert page.locator("#story .turn-number").all_text_contents() == ["1."]
        assert "змей" in page.locator("#cards").input_value()
