"""Socket-level limits of the REST door: every socket counts, from accept to close.

uvicorn's `limit_concurrency` only answers *requests* with 503 once too many connections are open; it accepts
every socket, so idle sockets and half-sent heads pile up until the process runs out of file descriptors (and it
logs one warning per refused request). Here the H11 protocol (serving.gateway.rest.make_protocol) asks a
`ConnectionGuard` at accept time, before any TLS handshake:

- a token bucket per client address bounds the accept rate (a reconnecting flood is closed at once, cheaply);
- at `max_connections`, the socket that made no progress for longest is closed to make room: a TLS handshake
  first, else an idle one (request head still arriving, or keep-alive). A flood of idle, slow or reconnecting
  sockets therefore cannot keep out a real client that completes its handshake and request promptly (a probe);
  only when every socket has a request in flight is the newcomer closed.

`raise_fd_limit` lifts the soft RLIMIT_NOFILE to the hard one at start-up and caps `max_connections` below it, and
`Throttled` is a logging filter that lets one line per message template through per interval (a flood of
failures must not become a flood of log).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from typing import Callable, Optional, Protocol

log = logging.getLogger("medpipe.gateway")

FD_RESERVE = 256  # descriptors kept, beyond those open at start-up, for gRPC threads, PACS, spool and audit files


class Connection(Protocol):
    def started(self) -> bool: ...  # the TLS handshake (if any) is done

    def idle(self) -> bool: ...  # no request in flight

    def shed(self, reason: str) -> None: ...


class AcceptRate:
    """A token bucket per client address: `per_second` sustained, `burst` at once. Bounded memory: at most
    `max_addresses` buckets; full buckets (addresses that went quiet) are forgotten first."""

    def __init__(self, per_second: float, burst: float, max_addresses: int = 65536,
                 clock: Callable[[], float] = time.monotonic):
        self.per_second, self.burst, self.max_addresses, self.clock = per_second, max(1.0, burst), max_addresses, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

    def allow(self, address: Optional[str]) -> bool:
        if self.per_second <= 0:
            return True
        key = address or "?"
        now = self.clock()
        tokens, at = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_second)
        allowed = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > self.max_addresses:
            self._forget(now)
        return allowed

    def _forget(self, now: float) -> None:
        full = [k for k, (tokens, at) in self.buckets.items()
                if tokens + (now - at) * self.per_second >= self.burst]
        for key in full:
            del self.buckets[key]
        while len(self.buckets) > self.max_addresses:  # all busy: forget the least recently seen
            self.buckets.popitem(last=False)


class ConnectionGuard:
    """The REST door's open sockets, oldest first. Used from the event loop thread only (no lock)."""

    def __init__(self, max_connections: int, accept_rate: AcceptRate, on_refuse: Callable[[str], None] = None):
        self.max_connections = max_connections
        self.accept_rate = accept_rate
        self.on_refuse = on_refuse or (lambda reason: None)
        self.open: OrderedDict[Connection, None] = OrderedDict()

    def admit(self, connection: Connection, address: Optional[str]) -> bool:
        """True: `connection` is counted (call `release` when it closes). False: close it, it was refused."""
        if not self.accept_rate.allow(address):
            self.on_refuse("accept_rate")
            return False
        if len(self.open) >= self.max_connections and not self._evict_idle():
            self.on_refuse("connections")
            return False
        self.open[connection] = None
        return True

    def release(self, connection: Connection) -> None:
        self.open.pop(connection, None)

    def touch(self, connection: Connection) -> None:
        """`connection` made progress (handshake done, request bytes): it becomes the last to be shed."""
        if connection in self.open:
            self.open.move_to_end(connection)

    def _evict_idle(self) -> bool:
        """Shed the socket that made no progress for longest: a pending handshake first, else any idle one."""
        victim = next((c for c in self.open if not c.started()), None) or next(
            (c for c in self.open if c.idle()), None)
        if victim is None:
            return False
        self.release(victim)
        victim.shed("connections")
        self.on_refuse("connections")
        return True


def raise_fd_limit(max_connections: int, doors: int = 2) -> int:
    """Soft RLIMIT_NOFILE -> hard; -> the max_connections per door (REST, gRPC) that fits under it, FD_RESERVE
    kept for the rest. One log line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit; the cap below still holds
    fitting = max(16, min(max_connections, (soft - _open_fds() - FD_RESERVE) // doors))
    log.info("file descriptors: limit %d; REST and gRPC connections at most %d each%s", soft, fitting,
             "" if fitting == max_connections else f" (max_connections {max_connections} lowered to fit: raise "
             "the hard limit, e.g. `ulimit -Hn` or docker-compose ulimits.nofile)")
    return fitting


def _open_fds() -> int:
    """Descriptors this process holds now (libraries, threads, files), where the OS says; else a guess."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


class Throttled(logging.Filter):
    """At most one record per (logger, message template) every `interval` seconds; the next one that passes says
    how many were dropped. Attach to handlers: a failure repeated thousands of times a second stays one line."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic, max_keys: int = 4096):
        super().__init__()
        self.interval, self.clock, self.max_keys = interval, clock, max_keys
        self.seen: dict[tuple, list] = {}  # key -> [last passed at, dropped since]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = self.clock()
        with self.lock:
            entry = self.seen.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            dropped = entry[1] if entry else 0
            if len(self.seen) >= self.max_keys:
                self.seen.clear()
            self.seen[key] = [now, 0]
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {self.interval:g} s]"
        return True


def throttle_logging(interval: float = 60.0) -> None:
    """Put one shared Throttled filter on every handler of the root logger (the console and the log file)."""
    shared = Throttled(interval)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, Throttled) for f in handler.filters):
            handler.addFilter(shared)
