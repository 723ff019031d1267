"""What the API's server spends on a connection, bounded before anyone is authenticated.

uvicorn accepts every connection and waits for its request without a limit: 1,100 idle sockets used up
the daemon's 1,024 file handles before a key was checked. Each connection here goes through a
`ConnectionGuard`:

- at most `limit` are open (http.max_connections, kept below the open-file limit); at the limit the
  connection idle the longest (no request in progress) is closed for the new one, or the new one is
  closed when every connection is in a request: /health still gets in past a flood of idle sockets;
- a connection must send a request's headers within `header_timeout` seconds of connecting, or of its
  last response (slow-loris); uvicorn's own keep-alive timer is cancelled by any byte;
- a request's body is the app's business: httpupload.py times each pause and the whole upload.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

# Open files kept for everything but connections (SQLite, folders, models, logs) and for a batch of
# connections accepted before the guard has seen them (api.LISTEN_BACKLOG).
FD_RESERVE = 512


def connection_limit(configured: int, open_files: int) -> int:
    """At most `configured` connections, and never so many that the open-file limit is reached."""
    return max(8, min(configured, open_files - FD_RESERVE))


class ConnectionGuard:
    """The open connections of one server, least recently active first."""

    def __init__(self, limit: int, header_timeout: float) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self._lock = threading.Lock()  # the event loop's thread only, but counters are read from others
        self._open: dict[GuardedProtocol, None] = {}
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # new connections closed because every place was in a request
        self.timed_out = 0  # connections that sent no complete headers in time

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def admit(self, conn: GuardedProtocol) -> bool:
        """Count a new connection; False when it must be closed (every place holds a request)."""
        with self._lock:
            victim = None
            if len(self._open) >= self.limit:
                victim = next((c for c in self._open if c.idle), None)
                if victim is None:
                    self.refused += 1
                    return False
                del self._open[victim]
                self.evicted += 1
            self._open[conn] = None
        if victim is not None:
            victim.drop()
        return True

    def touch(self, conn: GuardedProtocol) -> None:
        """The connection finished a request: it goes to the back of the eviction order."""
        with self._lock:
            if conn in self._open:
                del self._open[conn]
                self._open[conn] = None

    def forget(self, conn: GuardedProtocol) -> None:
        with self._lock:
            self._open.pop(conn, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"open": len(self._open), "limit": self.limit, "evicted": self.evicted, "refused": self.refused,
                    "header_timeouts": self.timed_out}


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard (the guard is set on a subclass: guarded_protocol)."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request in progress: still to send its headers, or between requests."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.drop()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if not self.idle:
            self._cancel_header_timer()  # the headers are in: the body's time is the app's to judge

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.guard.touch(self)
        if self.idle and not self.transport.is_closing():
            self._arm_header_timer()

    def drop(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.guard.header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.idle and not self.transport.is_closing():
            with self.guard._lock:
                self.guard.timed_out += 1
            self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """The protocol class uvicorn is given (Config(http=...)): GuardedProtocol bound to this guard."""
    return type("BgwatchH11Protocol", (GuardedProtocol,), {"guard": guard})
