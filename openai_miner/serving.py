"""Every front's uvicorn server on one event loop, in one background thread.

The token sources hold clients bound to the event loop that first used them (the upstream's
connection pool, the local model's hand-back of tokens), so the fronts share one loop: the axon's
server and the HTTP front's server run side by side in it, as two ``uvicorn.Server.serve()``
tasks. Stopping asks each to exit, with a bounded grace for answers in flight.
"""

import asyncio
import fcntl
import functools
import logging
import resource
import select
import socket
import struct
import termios
import threading
from collections import OrderedDict
from typing import Any

import bittensor as bt
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from openai_miner.access import Access


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


class Places:
    """The connections of one front, kept to ``limit``: a connection that has not sent a whole
    request never takes a validator's place.

    Counting every open connection, as uvicorn's ``limit_concurrency`` does, let sockets that
    never send a byte lock every validator out (999 were enough), and reopening each as the idle
    timer closed it kept them out for good. Here a newcomer at the limit takes the place of the
    oldest connection that is not being answered: first one that has never sent a byte, then one
    kept alive after an answer and waiting for its next request (a client that asked before), then
    one still sending its request. Connections being answered are never closed; with all
    ``limit`` of them answering, the newcomer's request gets uvicorn's 503.

    A waiting connection whose request is already in its socket, unread, counts as sending: the
    loop accepts a whole backlog of connections before it reads any, and a validator's, accepted
    early in a burst of silent ones, would otherwise make room for the rest of the burst. Used
    from the serving loop's thread only.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        # The connections not being answered, each oldest first: never sent a byte, kept alive after
        # an answer, sending a request.
        self.silent: OrderedDict[IdleClosing, None] = OrderedDict()
        self.kept: OrderedDict[IdleClosing, None] = OrderedDict()
        self.sending: OrderedDict[IdleClosing, None] = OrderedDict()

    def join(self, connection: "IdleClosing") -> None:
        """A new connection, silent; at the limit, the oldest one not being answered makes room."""
        if self.open >= self.limit:
            self.close_oldest_waiting()
        self.open += 1
        self.silent[connection] = None

    def close_oldest_waiting(self) -> None:
        """Close the first connection the class docstring's order gives; one found with its request
        unread moves to the sending ones instead."""
        for waiting in (self.silent, self.kept):
            while waiting:
                oldest = waiting.popitem(last=False)[0]
                if not oldest.unread():
                    oldest.make_room()
                    return
                self.sending[oldest] = None
        if self.sending:
            self.sending.popitem(last=False)[0].make_room()

    def sends(self, connection: "IdleClosing") -> None:
        """``connection`` sent the first bytes of a request."""
        if connection in self.silent or connection in self.kept:
            self.answering(connection)
            self.sending[connection] = None

    def answering(self, connection: "IdleClosing") -> None:
        """``connection`` sent a whole request: its place is its own until the answer ends."""
        for waiting in (self.silent, self.kept, self.sending):
            waiting.pop(connection, None)

    def answered(self, connection: "IdleClosing") -> None:
        """``connection`` was answered and, kept alive, waits for its next request."""
        self.answering(connection)
        self.kept[connection] = None

    def leave(self, connection: "IdleClosing") -> None:
        self.answering(connection)
        self.open -= 1


class IdleClosing(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, closing a connection that sends nothing, or sends a request too
    slowly, and keeping the front's connections to its :class:`Places`.

    uvicorn times out idle keep-alive connections only after a first response: a client that
    connects and stays silent would hold a file descriptor forever. The same keep-alive timer now
    starts when the connection opens. Any byte cancels that timer, so a client sending a request
    a byte at a time ("slowloris"), in its headers or in the body they announce, would hold the
    connection as long: a request, headers and body, must all arrive within the same time from
    its first byte.

    Bytes that are not HTTP count as a refusal of their address, in the refusal summary and
    towards its cut-off, instead of a warning line per connection.
    """

    request_due: asyncio.TimerHandle | None = None
    turned_away = False
    spoke = False

    def __init__(self, *args: Any, access: Access, places: Places, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access = access
        self.places = places

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        if self.access.offenders.cut_off(self.peer):  # before uvicorn sets anything up for it
            self.turned_away = True
            transport.abort()
            return
        super().connection_made(transport)
        self.places.join(self)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.access.offenders.cut_off(self.peer):  # cut off while this connection was open: unread
            self.transport.abort()
            return
        self.spoke = True
        starts_a_request = self.cycle is None or self.cycle.response_complete
        super().data_received(data)
        if self.received():
            self.request_in()
            self.places.answering(self)
        elif starts_a_request:
            self.places.sends(self)
            if self.request_due is None:
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

    def unread(self) -> bool:
        """Whether bytes this connection sent wait in its socket, not yet read by the loop."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:
            return False
        try:
            waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return struct.unpack("i", waiting)[0] > 0

    def make_room(self) -> None:
        """Close this connection for a newcomer; one that never sent a byte counts as a refusal."""
        if not self.spoke:
            self.access.refused(self.peer, "a connection that sent nothing, closed for a newcomer")
        self.request_in()
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.received():  # a pipelined request, already in
            self.places.answering(self)
        elif not self.transport.is_closing():
            self.places.answered(self)

    def send_400_response(self, msg: str) -> None:
        self.access.refused(self.peer, "bytes that are not an HTTP request")
        super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.turned_away:
            return
        self.places.leave(self)
        self.request_in()
        super().connection_lost(exc)


class _NotHttp(logging.Filter):
    """Drops uvicorn's warning for every connection that sends junk: counted as a refusal instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


def harden(config: uvicorn.Config, *, idle: float, max_connections: int, access: Access) -> Places:
    """Close silent connections after ``idle`` seconds, and those of offenders unread; keep at
    most ``max_connections`` (:class:`Places`), answering 503 only when all of them are answering."""
    places = Places(max_connections)
    config.http = functools.partial(IdleClosing, access=access, places=places)
    config.timeout_keep_alive = idle
    # uvicorn's 503: past every place busy answering (Places keeps the rest to the limit).
    config.limit_concurrency = max_connections + 1
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _NotHttp) for existing in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_NotHttp())
    return places


# Files the process holds besides its fronts' connections: the model, logs, the chain, pipes.
OTHER_FILES = 256


def places_per_front(files: int, fronts: int, wanted: int) -> int:
    """Connections each front may hold within the open-file limit ``files``: an answered request
    holds two (the validator's, and the upstream's). Past the limit the kernel refuses ``accept``
    and asyncio stops accepting on that port for a second, a lockout of its own."""
    return max(1, min(wanted, (files - OTHER_FILES) // (2 * fronts)))


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
