"""The pure parts of the connection and sign-in limits, on a fake clock: accept buckets, which socket is shed at
the cap, log throttling, back-off arithmetic, the lockout state file shared with the CLI, and session revocation.
The end-to-end versions are tests/test_gateway_floods.py and tests/test_viewer_signin.py."""

from __future__ import annotations

import logging

from serving.gateway.connections import AcceptRate, ConnectionGuard, Throttled
from serving.viewer import signin


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeConnection:
    def __init__(self, name, started=True, idle=True):
        self.name, self._started, self._idle, self.shed_for = name, started, idle, None

    def started(self):
        return self._started

    def idle(self):
        return self._idle

    def shed(self, reason):
        self.shed_for = reason


def test_accept_rate_is_a_bucket_per_address():
    clock = Clock()
    rate = AcceptRate(per_second=2, burst=3, clock=clock)
    assert [rate.allow("10.0.0.1") for _ in range(5)] == [True, True, True, False, False]
    assert rate.allow("10.0.0.2"), "another address has its own bucket"
    clock.now += 1.0
    assert [rate.allow("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert AcceptRate(per_second=0, burst=1).allow("x"), "0 switches the limit off"


def test_accept_rate_memory_is_bounded():
    rate = AcceptRate(per_second=1, burst=1, max_addresses=100, clock=Clock())
    for i in range(1000):
        rate.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(rate.buckets) <= 100


def test_the_guard_sheds_a_pending_handshake_first_then_the_least_recently_active_idle_socket():
    refused = []
    guard = ConnectionGuard(3, AcceptRate(0, 1), on_refuse=refused.append)
    busy = FakeConnection("busy", idle=False)
    idle_old, idle_new = FakeConnection("idle-old"), FakeConnection("idle-new")
    for connection in (busy, idle_old, idle_new):
        assert guard.admit(connection, "a")
    handshake = FakeConnection("handshake", started=False)
    assert guard.admit(handshake, "a") and idle_old.shed_for == "connections"
    guard.touch(idle_new)
    newcomer = FakeConnection("newcomer")
    assert guard.admit(newcomer, "a") and handshake.shed_for == "connections", "a pending handshake goes first"
    assert list(guard.open) == [busy, idle_new, newcomer]
    guard.touch(idle_new)
    assert guard.admit(FakeConnection("next"), "a") and newcomer.shed_for == "connections"
    busy2, busy3 = FakeConnection("b2", idle=False), FakeConnection("b3", idle=False)
    guard.open.clear()
    for connection in (busy, busy2, busy3):
        guard.admit(connection, "a")
    assert not guard.admit(FakeConnection("late"), "a"), "all busy: the newcomer is refused"
    assert refused.count("connections") == 4


def test_throttled_logging_lets_one_line_per_template_through_per_interval():
    clock = Clock()
    throttle = Throttled(interval=60, clock=clock)

    def record(msg, *args):
        return logging.LogRecord("medpipe.gateway", logging.ERROR, __file__, 1, msg, args, None)

    passed = [throttle.filter(record("PACS loop %s failed: %s", "a", i)) for i in range(1000)]
    assert passed.count(True) == 1
    assert throttle.filter(record("another message"))
    clock.now += 61
    again = record("PACS loop %s failed: %s", "a", 1)
    assert throttle.filter(again) and "999 more like this" in again.getMessage()


def test_backoff_doubles_after_three_free_failures_up_to_a_cap():
    assert [signin.backoff_seconds(n) for n in range(1, 8)] == [0, 0, 0, 1, 2, 4, 8]
    assert signin.backoff_seconds(30) == signin.MAX_BACKOFF_S


def test_lockout_counts_refused_attempts_locks_at_twenty_and_the_cli_unlock_frees_it(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("")
    clock = Clock()
    lockout = signin.Lockout(users, clock=clock)
    outcomes = []
    for _ in range(signin.LOCK_FAILURES):
        verdict = lockout.check("alice", "10.0.0.9")
        outcomes.append(verdict)
        if verdict.allowed:
            lockout.fail("alice", "10.0.0.9")  # a wrong password
    assert sum(v.allowed for v in outcomes) == signin.FREE_FAILURES + 1
    assert sum(v.just_locked for v in outcomes) == 1
    locked = lockout.check("alice", "10.0.0.9")
    assert not locked.allowed and locked.locked
    assert signin.lockout_path(users).stat().st_mode & 0o777 == 0o600
    # the CLI is another process with its own Lockout on the same file
    assert signin.Lockout(users, clock=clock).unlock("alice")
    assert lockout.check("alice", "10.0.0.9").allowed, "unlocked, and past this address's back-off"
    assert not lockout.check("bob", "10.0.0.9").allowed, "the address still backs off for other accounts"
    clock.now += signin.MAX_BACKOFF_S + 1
    lockout.succeed("bob", "10.0.0.9")
    assert lockout.status() == {"alice": {"unlocked_at": 1000.0}}


def test_sessions_end_at_logout_expiry_removal_and_password_change():
    clock = Clock()
    sessions = signin.Sessions(lifetime_s=100, clock=clock)
    hashes = {"alice": "scrypt$old"}
    current = hashes.get
    first, second, third = (sessions.create("alice", "scrypt$old") for _ in range(3))
    assert sessions.get(first, current).user == "alice"
    sessions.revoke(first)
    assert sessions.get(first, current) is None
    hashes["alice"] = "scrypt$new"
    assert sessions.get(second, current) is None
    del hashes["alice"]
    assert sessions.get(third, current) is None
    fresh = sessions.create("bob", "h")
    clock.now += 101
    assert sessions.get(fresh, {"bob": "h"}.get) is None
    assert sessions.get("not-a-session", current) is None
