"""The cluster's one piece of shared state: per-key request counts and per-adventure locks, held by replicas.

`rugpt serve --replicas N` runs this class as one small named Ray actor (see cluster.py); it is plain Python,
so the tests drive it directly. Every lease and lock belongs to a holder (a replica) that reports in every
second; a holder silent for `ttl` seconds (its process died) loses all it held, so a killed replica never
keeps a key's slots or an adventure's lock. The actor restarts when it dies (state lost); each replica's
next report gives back the leases it still holds, so counts come back within a second.

API keys never reach it: requests are counted by the key's SHA-256.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

DEFAULT_TTL = 5.0
REPORT_EVERY = 1.0  # seconds between a replica's reports; well under DEFAULT_TTL


@dataclass
class _Holder:
    pid: int
    seen: float
    leases: dict[str, str] = field(default_factory=dict)  # lease id → key hash


class Ledger:
    """Leases (one per request of a limited key) and locks (one per adventure being changed), by holder."""

    def __init__(self, ttl: float = DEFAULT_TTL, clock=time.monotonic):
        self.ttl, self._clock = ttl, clock
        self._holders: dict[str, _Holder] = {}
        self._locks: dict[str, tuple[str, str]] = {}  # lock name → (holder, lock id)
        self._freed: dict[str, asyncio.Event] = {}  # lock name → set when it is released

    # --- holders ---------------------------------------------------------------------------------------------

    def report(self, holder: str, pid: int, leases: dict[str, str]) -> None:
        """A holder is alive. A holder the ledger does not know (it restarted, or the holder was silent too long)
        gets back the leases it still holds; a known one keeps the ledger's own record, which is newer."""
        known = self._holders.get(holder)
        if known is None:
            self._holders[holder] = _Holder(pid, self._clock(), dict(leases))
        else:
            known.seen = self._clock()

    def replicas(self) -> dict[str, int]:
        """Holders heard from within `ttl`, with their process ids."""
        self._expire()
        return {name: holder.pid for name, holder in self._holders.items()}

    def _expire(self) -> None:
        now = self._clock()
        for name in [n for n, h in self._holders.items() if now - h.seen > self.ttl]:
            del self._holders[name]
            for lock in [lock for lock, (owner, _) in self._locks.items() if owner == name]:
                self._release_lock(lock)

    # --- per-key leases --------------------------------------------------------------------------------------

    def acquire(self, holder: str, lease: str, key_hash: str, limit: int) -> bool:
        """Take one of `limit` slots of a key for a request; False when all are taken, across all holders."""
        self._expire()
        held = Counter(k for h in self._holders.values() for k in h.leases.values())
        if held[key_hash] >= limit:
            return False
        self._holders.setdefault(holder, _Holder(0, self._clock())).leases[lease] = key_hash
        return True

    def release(self, holder: str, lease: str) -> None:
        known = self._holders.get(holder)
        if known is not None:
            known.leases.pop(lease, None)

    def in_flight(self, key_hash: str) -> int:
        self._expire()
        return sum(k == key_hash for h in self._holders.values() for k in h.leases.values())

    # --- locks ----------------------------------------------------------------------------------------------

    async def lock(self, name: str, holder: str, timeout: float) -> str | None:
        """Wait until `name` is free, then hold it; its lock id, or None after `timeout` seconds."""
        deadline = self._clock() + timeout
        while True:
            self._expire()
            if name not in self._locks:
                lock_id = secrets.token_hex(8)
                self._locks[name] = (holder, lock_id)
                self._holders.setdefault(holder, _Holder(0, self._clock()))
                return lock_id
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            freed = self._freed.setdefault(name, asyncio.Event())
            try:  # wake when it is released, or after a while to expire a holder that went silent
                await asyncio.wait_for(freed.wait(), min(remaining, REPORT_EVERY))
            except TimeoutError:
                pass

    def unlock(self, name: str, lock_id: str) -> None:
        if self._locks.get(name, (None, None))[1] == lock_id:
            self._release_lock(name)

    def _release_lock(self, name: str) -> None:
        self._locks.pop(name, None)
        freed = self._freed.pop(name, None)
        if freed is not None:
            freed.set()
