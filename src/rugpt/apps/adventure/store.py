"""Saved adventures in one SQLite file. Each change is one transaction, so a crash loses no saved turn.

Each adventure belongs to a token: 32 random bytes, shown to its player once at creation. The file
keeps only the token's SHA-256, and every web request finds its adventure by that hash alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rugpt.apps.adventure.state import Adventure, Origin, Turn, adventure_from_header
from rugpt.errors import DataError, RugptError

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS adventures (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    header TEXT NOT NULL,            -- JSON: title, world, memory, note, cards, lorebooks, settings
    length INTEGER NOT NULL,         -- turns[:length] is the story, the rest the redo stack
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    adventure_id INTEGER NOT NULL REFERENCES adventures(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    turn TEXT NOT NULL,              -- JSON of one Turn
    PRIMARY KEY (adventure_id, position)
);
"""
# Version 2: the file an adventure was imported from, written once and read only for an export.
ORIGINS = """
CREATE TABLE IF NOT EXISTS origins (
    adventure_id INTEGER PRIMARY KEY REFERENCES adventures(id) ON DELETE CASCADE,
    format TEXT NOT NULL,
    document TEXT NOT NULL,          -- JSON as the file had it
    blob BLOB                        -- a PNG card's image or a .charx zip
);
"""


class AdventureNotFound(RugptError, LookupError):
    """No adventure has this token (or id): it never existed, was deleted, or the token is mistyped."""


@dataclass(frozen=True)
class SavedAdventure:
    """A line of the local list of adventures (the terminal's "continue" menu)."""

    id: int
    title: str
    turns: int
    updated: float


def default_store_path() -> Path:
    """Where adventures are kept unless a path is given: $XDG_DATA_HOME/rugpt/adventures.sqlite3."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "rugpt" / "adventures.sqlite3"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class AdventureStore:
    """Adventures and their turns in SQLite; safe to share between threads of one process."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; `_transaction` opens and ends each one itself.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a committed turn is on disk before the call returns
        self._conn.execute("PRAGMA foreign_keys=ON")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise DataError(f"adventure store {str(self.path)!r} has schema version {version}; this rugpt reads "
                            f"versions 1 and {SCHEMA_VERSION} — use a newer rugpt or another --db file")
        if version < SCHEMA_VERSION:  # a new file, or one of version 1: its adventures load as they are
            with self._transaction() as db:
                for statement in filter(str.strip, (SCHEMA if version == 0 else "").split(";") + ORIGINS.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: everything inside is saved together or not at all."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """Reads that see one committed state: no half-saved turn of this or another thread or process."""
        with self._lock:  # the connection is shared: a read must not run inside another thread's transaction
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def create(self, adventure: Adventure) -> str:
        """Save a new adventure with all its turns; returns its token (the only time it is known)."""
        # security: 256 random bits; only its hash is stored, so the file alone grants no access.
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO adventures (token_hash, header, length, created, updated) VALUES (?, ?, ?, ?, ?)",
                (token_hash(token), _dumps(adventure.header()), adventure.length, now, now),
            )
            adventure.id = cursor.lastrowid
            db.executemany("INSERT INTO turns (adventure_id, position, turn) VALUES (?, ?, ?)",
                           [(adventure.id, i, _dumps(t.to_dict())) for i, t in enumerate(adventure.turns)])
            if adventure.origin is not None:
                origin = adventure.origin
                db.execute("INSERT INTO origins (adventure_id, format, document, blob) VALUES (?, ?, ?, ?)",
                           (adventure.id, origin.format, _dumps(origin.document), origin.blob))
        return token

    def load_origin(self, adventure: Adventure) -> Origin | None:
        """The file the adventure was imported from (set on `adventure.origin` too); None if it was not imported."""
        if adventure.origin is None and adventure.id is not None:
            with self._snapshot() as db:
                row = db.execute("SELECT format, document, blob FROM origins WHERE adventure_id = ?",
                                 (adventure.id,)).fetchone()
            if row is not None:
                adventure.origin = Origin(row[0], json.loads(row[1]), row[2])
        return adventure.origin

    def load(self, token: str) -> Adventure:
        """The adventure of this token; AdventureNotFound when there is none."""
        # security: looked up by the hash, so neither the token nor a prefix of it is compared char by char.
        with self._snapshot() as db:
            row = db.execute("SELECT id FROM adventures WHERE token_hash = ?", (token_hash(token),)).fetchone()
        if row is None:
            raise AdventureNotFound("no adventure has this token: start a new one or import a saved game")
        return self.load_by_id(row[0])

    def load_by_id(self, adventure_id: int) -> Adventure:
        """For the local terminal only, whose user owns the file; the web finds adventures by token."""
        with self._snapshot() as db:
            row = db.execute("SELECT header, length FROM adventures WHERE id = ?", (adventure_id,)).fetchone()
            turns = db.execute("SELECT turn FROM turns WHERE adventure_id = ? ORDER BY position",
                               (adventure_id,)).fetchall()
        if row is None:
            raise AdventureNotFound(f"no adventure has id {adventure_id}; `rugpt play --list` shows the saved ones")
        adventure = adventure_from_header(json.loads(row[0]))
        adventure.turns = [Turn.from_dict(json.loads(t[0])) for t in turns]
        adventure.length, adventure.id = min(row[1], len(adventure.turns)), adventure_id
        return adventure

    def list_adventures(self) -> list[SavedAdventure]:
        """Every adventure in the file, latest first (for the local terminal)."""
        with self._snapshot() as db:
            rows = db.execute("SELECT id, header, length, updated FROM adventures ORDER BY updated DESC").fetchall()
        return [SavedAdventure(i, json.loads(h).get("title", ""), n, u) for i, h, n, u in rows]

    def save(self, adventure: Adventure, changed: Iterable[int] = ()) -> None:
        """Save the header, the length and the turns at the `changed` positions, in one transaction."""
        if adventure.id is None:
            raise ValueError("save() needs an adventure that create() has stored")
        with self._transaction() as db:
            cursor = db.execute("UPDATE adventures SET header = ?, length = ?, updated = ? WHERE id = ?",
                                (_dumps(adventure.header()), adventure.length, time.time(), adventure.id))
            if cursor.rowcount == 0:
                raise AdventureNotFound(f"adventure {adventure.id} was deleted")
            db.execute("DELETE FROM turns WHERE adventure_id = ? AND position >= ?",
                       (adventure.id, len(adventure.turns)))
            db.executemany("INSERT OR REPLACE INTO turns (adventure_id, position, turn) VALUES (?, ?, ?)",
                           [(adventure.id, i, _dumps(adventure.turns[i].to_dict())) for i in changed])

    def delete(self, adventure: Adventure) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM adventures WHERE id = ?", (adventure.id,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _dumps(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False)
