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
