"""Viewer sign-in defences: failure back-off and lockout, password checks off the event loop, server-side sessions.

- `Lockout`: per account and per client address, failed sign-ins earn an exponential back-off (the first
  `FREE_FAILURES` are free; then 1 s, 2 s, 4 s ... up to `MAX_BACKOFF_S`); while it runs, every attempt is refused
  without checking the password (even the right one) and counts as one more failure. `LOCK_FAILURES` failures lock
  the account for `LOCK_SECONDS` (audited by the caller) or until `medpipe viewer-users unlock NAME`. The accounts'
  state lives in USERS_FILE.lockout.json (0600), read and written under an exclusive lock by both the gateway and
  the CLI; per-address state lives in memory (bounded).
- `HashPool`: scrypt (hashlib releases the GIL) on a small thread pool; beyond `queue` waiting checks a sign-in is
  refused at once (503) rather than stalling the REST door.
- `Sessions`: the cookie is a random id; the server holds who it is, since when, and a fingerprint of the password
  hash. Logout forgets it; a user removed from the users file or whose password changed (`medpipe viewer-users`)
  is signed out at their next request. Sessions are held in memory only: a gateway restart signs readers out
  (nothing secret is written to disk, and a stolen disk copy holds no live session).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

FREE_FAILURES = 3
BASE_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0
LOCK_FAILURES = 20
LOCK_SECONDS = 3600.0


def backoff_seconds(failures: int) -> float:
    """The wait after `failures` consecutive failures (pure)."""
    if failures <= FREE_FAILURES:
        return 0.0
    return min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (failures - FREE_FAILURES - 1))


def lockout_path(users_file: Path) -> Path:
    return users_file.with_name(users_file.name + ".lockout.json")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    wait_s: float = 0.0
    locked: bool = False  # the account is locked (not only backing off)
    just_locked: bool = False  # this attempt locked it (audit it once)


class Lockout:
    def __init__(self, users_file: Optional[Path], clock: Callable[[], float] = time.time, max_addresses: int = 65536):
        self.path = lockout_path(users_file) if users_file else None
        self.clock = clock
        self.max_addresses = max_addresses
        # address -> (failures, back-off until, last failure at)
        self.addresses: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self.lock = threading.Lock()

    # -- the accounts' shared state file -----------------------------------------------------------------------
    def _update(self, change: Callable[[dict], Optional[dict]]) -> dict:
        """Read-modify-write the state file under an exclusive flock; `change` edits the dict in place (returning
        anything but None writes it back). -> the state."""
        if self.path is None:
            return {}
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            text = handle.read()
            try:
                state = json.loads(text) if text.strip() else {}
            except ValueError:
                state = {}  # unreadable: start again (the worst case is that a lock is forgotten)
            if not isinstance(state, dict):
                state = {}
            if change(state) is not None:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(state, sort_keys=True))
                handle.flush()  # no fsync: one per guess would be a disk flood; a crash forgets a few counts
        return state

    def check(self, account: Optional[str], address: Optional[str]) -> Verdict:
        """May this attempt be checked at all? A refused attempt counts as a failure (it was a guess), except on a
        locked account (the lock is not extended by knocking)."""
        now = self.clock()
        entry = (self._update(lambda state: None).get(account) or {}) if account else {}
        if entry.get("locked_until", 0) > now:
            return Verdict(False, entry["locked_until"] - now, locked=True)
        with self.lock:
            _, address_until, address_last = self.addresses.get(address or "?", (0, 0.0, 0.0))
        if entry.get("unlocked_at", 0) >= address_last > 0:
            address_until = 0.0  # an admin unlocked this account since this address last failed
        wait = max(address_until, entry.get("until", 0)) - now
        if wait > 0:
            locked = self.fail(account, address)
            return Verdict(False, LOCK_SECONDS if locked else wait, locked=locked, just_locked=locked)
        return Verdict(True)

    def fail(self, account: Optional[str], address: Optional[str]) -> bool:
        """Count a failure; -> True when it locked the account just now."""
        now = self.clock()
        with self.lock:
            failures, _, _ = self.addresses.pop(address or "?", (0, 0.0, 0.0))
            failures += 1
            self.addresses[address or "?"] = (failures, now + backoff_seconds(failures), now)
            while len(self.addresses) > self.max_addresses:
                self.addresses.popitem(last=False)
        if account is None:
            return False
        locked_now = False

        def change(state: dict) -> dict:
            nonlocal locked_now
            entry = state.setdefault(account, {})
            entry["failures"] = failures = int(entry.get("failures", 0)) + 1
            entry["until"] = now + backoff_seconds(failures)
            if failures >= LOCK_FAILURES and entry.get("locked_until", 0) <= now:
                entry["locked_until"] = now + LOCK_SECONDS
                locked_now = True
            return state

        self._update(change)
        return locked_now

    def succeed(self, account: str, address: Optional[str]) -> None:
        with self.lock:
            self.addresses.pop(address or "?", None)
        self._update(lambda state: state if state.pop(account, None) is not None else None)

    def unlock(self, account: str) -> bool:
        """The admin's unlock: forget the account's failures and lock (and let it past the back-off of the
        addresses that failed on it so far). -> whether it was locked or backing off."""
        found = False
        now = self.clock()

        def change(state: dict) -> dict:
            nonlocal found
            found = bool(state.get(account, {}).get("failures"))
            state[account] = {"unlocked_at": now}
            return state

        self._update(change)
        return found

    def status(self) -> dict:
        return self._update(lambda state: None)


class Busy(Exception):
    """More sign-ins are waiting than the pool takes: refuse now, never queue without bound."""


class HashPool:
    """Password checks on `workers` threads, at most `queue` waiting; used from the event loop thread only."""

    def __init__(self, workers: int | None = None, queue: int = 16):
        # half the cores (at least one): scrypt must leave a core to the event loop and the model traffic
        workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scrypt", initializer=_yield_cpu)
        self.limit = workers + queue
        self.pending = 0

    async def run(self, function, *args):
        if self.pending >= self.limit:
            raise Busy()
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)
        finally:
            self.pending -= 1


def _yield_cpu() -> None:
    """A scrypt thread runs at a lower priority (Linux: per-thread nice), so that on a busy machine the event loop
    and the predictions come first and sign-ins wait."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


@dataclass(frozen=True)
class Session:
    user: str
    fingerprint: str
    created: float


def fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]


class Sessions:
    """Random session ids -> Session, in memory, bounded (the oldest is forgotten first)."""

    def __init__(self, lifetime_s: float, max_sessions: int = 10_000, clock: Callable[[], float] = time.time):
        self.lifetime_s, self.max_sessions, self.clock = lifetime_s, max_sessions, clock
        self.by_id: OrderedDict[str, Session] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()  # the id itself is not kept in memory dumps

    def create(self, user: str, password_hash: str) -> str:
        session_id = secrets.token_urlsafe(32)
        with self.lock:
            self.by_id[self._key(session_id)] = Session(user, fingerprint(password_hash), self.clock())
            while len(self.by_id) > self.max_sessions:
                self.by_id.popitem(last=False)
        return session_id

    def get(self, session_id: str, current_hash: Callable[[str], Optional[str]]) -> Optional[Session]:
        """The live session, or None (and forgotten) when expired, or the user is gone or changed password."""
        key = self._key(session_id)
        with self.lock:
            session = self.by_id.get(key)
        if session is None:
            return None
        password_hash = current_hash(session.user)
        if (self.clock() - session.created > self.lifetime_s or password_hash is None
                or fingerprint(password_hash) != session.fingerprint):
            self.revoke(session_id)
            return None
        return session

    def revoke(self, session_id: str) -> None:
        with self.lock:
            self.by_id.pop(self._key(session_id), None)
