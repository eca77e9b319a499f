"""Every front's uvicorn server on one event loop, in one background thread.

The token sources hold clients bound to the event loop that first used them (the upstream's
connection pool, the local model's hand-back of tokens), so the fronts share one loop: the axon's
server and the HTTP front's server run side by side in it, as two ``uvicorn.Server.serve()``
tasks. Stopping asks each to exit, with a bounded grace for answers in flight.
"""

import asyncio
import functools
import resource
import select
import socket
import threading
from typing import Any

import bittensor as bt
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from openai_miner.access import Offenders


class StopRequest:
    """A request to stop serving that a signal handler can make safely: one byte down a socket pair.

    A handler runs on the main thread between two bytecodes. If it raises (``KeyboardInterrupt``)
    it can land inside ``with lock:`` after the acquire and leave the lock held; if it sets a
    ``threading.Event`` it can block on a lock its own thread holds. Either way the stop hangs. A
    non-blocking ``send`` takes no lock, and ``select`` wakes the waiter at once.

    A signal can also be delivered to another thread, and then never wakes a main thread blocked
    in a wait: given to ``signal.set_wakeup_fd``, :meth:`fileno` makes every handled signal a stop.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self.fileno = self._writer.fileno
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def set(self) -> None:
        try:
            self._writer.send(b"\0")
        except BlockingIOError:  # the pair is full of earlier requests: already set
            pass

    def wait(self, timeout: float) -> bool:
        """Whether a stop was requested, waiting at most ``timeout`` seconds for one."""
        return bool(select.select([self._reader], [], [], timeout)[0])

    def clear(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass


class IdleClosing(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, also closing a connection that sends nothing, or sends a request too slowly.

    uvicorn times out idle keep-alive connections only after a first response: a client that
    connects and stays silent would hold a file descriptor forever, and enough of them lock
    validators out. The same keep-alive timer now starts when the connection opens. Any byte
    cancels that timer, so a client sending a request a byte at a time ("slowloris"), in its
    headers or in the body they announce, would hold the connection as long: a request, headers
    and body, must all arrive within the same time from its first byte.
    """

    request_due: asyncio.TimerHandle | None = None
    turned_away = False

    def __init__(self, *args: Any, offenders: Offenders, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offenders = offenders

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        if self.offenders.cut_off(self.peer):  # before uvicorn sets anything up for it
            self.turned_away = True
            transport.abort()
            return
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.offenders.cut_off(self.peer):  # cut off while this connection was open: unread
            self.transport.abort()
            return
        starts_a_request = self.cycle is None or self.cycle.response_complete
        super().data_received(data)
        if self.received():
            self.request_in()
        elif starts_a_request and self.request_due is None:
            self.request_due = self.loop.call_later(self.timeout_keep_alive, self.request_too_slow)

    def received(self) -> bool:
        """Whether the request being answered is all in: uvicorn has its headers and whole body."""
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.more_body

    def request_in(self) -> None:
        if self.request_due is not None:
            self.request_due.cancel()
            self.request_due = None

    def request_too_slow(self) -> None:
        self.request_due = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.turned_away:
            return
        self.request_in()
        super().connection_lost(exc)


def harden(config: uvicorn.Config, *, idle: float, max_connections: int, offenders: Offenders) -> None:
    """Close silent connections after ``idle`` seconds, and those of ``offenders`` unread; over
    ``max_connections`` at once, answer 503."""
    config.http = functools.partial(IdleClosing, offenders=offenders)
    config.timeout_keep_alive = idle
    config.limit_concurrency = max_connections


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit (each connection holds one); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError) as error:
            bt.logging.warning(f"could not raise the open-file limit from {soft} ({error}): each connection holds one")
    return soft


class Servers:
    """Starts ``servers`` on one loop in a daemon thread; :meth:`stop` ends them."""

    def __init__(self, servers: list[uvicorn.Server]) -> None:
        self.servers = servers
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="servers", daemon=True)
        self._thread.start()

    async def _serve(self) -> None:
        await asyncio.gather(*(server.serve() for server in self.servers))

    def stop(self, grace: float) -> None:
        """Ask every server to exit; in-flight answers get ``grace`` seconds, then are cancelled."""
        for server in self.servers:
            server.config.timeout_graceful_shutdown = grace
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=grace + 5)
            self._thread = None
