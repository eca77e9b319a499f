"""What every front's server does before any request reaches a front: its places, silent and slow
connections, bytes that are not HTTP. Driven through a real uvicorn server on 127.0.0.1 with a
tiny app, so each case takes milliseconds; tests/test_faults.py covers the same through a miner."""

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from openai_miner.access import Access, AccessPolicy, Offenders, RateLimiter, RecentPrompts, Refusals
from openai_miner.chain import Registry
from openai_miner.serving import OTHER_FILES, Places, Servers, harden, places_per_front
from openai_miner.testing.localnet import free_port
from tests.helpers import eventually

GET = b"GET /quick HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
JUNK = b"\x16\x03\x01 junk\r\n\r\n"  # a TLS hello's first bytes, then nonsense


# -- Places alone ------------------------------------------------------------------------------------


class Connection:
    def __init__(self, name: str, unread: bool = False) -> None:
        self.name = name
        self.closed = False
        self.waiting = unread

    def unread(self) -> bool:
        return self.waiting

    def make_room(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


def test_a_newcomer_takes_the_place_of_the_oldest_silent_then_the_oldest_still_sending() -> None:
    places = Places(3)
    a, b, c, d, e, f = (Connection(name) for name in "abcdef")
    for connection in (a, b, c):
        places.join(connection)  # type: ignore[arg-type]
    places.sends(a)  # type: ignore[arg-type]  # a started a request; b and c said nothing
    places.join(d)  # type: ignore[arg-type]
    assert [x for x in (a, b, c) if x.closed] == [b]  # the oldest silent one, not a (sending)
    places.leave(b)  # type: ignore[arg-type]
    places.answering(c)  # type: ignore[arg-type]  # c's request is all in: never closed for a newcomer
    places.answering(d)  # type: ignore[arg-type]
    places.join(e)  # type: ignore[arg-type]
    assert a.closed and not c.closed  # nothing silent: the oldest still sending
    places.leave(a)  # type: ignore[arg-type]
    places.answering(e)  # type: ignore[arg-type]
    places.join(f)  # type: ignore[arg-type]  # all three answering: f joins, uvicorn answers it 503
    assert not any(x.closed for x in (c, d, e)) and places.open == 4
    places.answered(c)  # type: ignore[arg-type]  # answered, kept alive: silent again, and evictable
    places.join(Connection("g"))  # type: ignore[arg-type]
    assert f.closed and not c.closed  # f joined silent before c went back to waiting


def test_one_that_never_spoke_makes_room_before_one_kept_alive_and_unread_requests_count_as_sending() -> None:
    places = Places(3)
    kept, early, a, b, c = Connection("kept"), Connection("early", unread=True), *(Connection(n) for n in "abc")
    places.join(kept)  # type: ignore[arg-type]
    places.answered(kept)  # type: ignore[arg-type]  # asked and was answered: waits for its next request
    for connection in (early, a, b):  # early's request waits in its socket, not read yet
        places.join(connection)  # type: ignore[arg-type]
    assert [x for x in (kept, early, a, b) if x.closed] == [a] and list(places.sending) == [early]
    places.join(c)  # type: ignore[arg-type]
    assert b.closed and not kept.closed  # b never spoke: it goes before the older kept-alive one
    kept.waiting = c.waiting = True  # their requests arrived, unread: nobody waits silent now
    places.join(Connection("d"))  # type: ignore[arg-type]
    assert early.closed and not (kept.closed or c.closed)  # the one sending longest goes
    assert list(places.sending) == [c, kept]


@pytest.mark.parametrize(
    "files,fronts,wanted,places",
    [(20_000, 2, 1000, 1000), (1024, 2, 1000, (1024 - OTHER_FILES) // 4), (1024, 1, 100, 100), (100, 1, 1000, 1)],
)
def test_places_fit_the_open_file_limit(files: int, fronts: int, wanted: int, places: int) -> None:
    assert places_per_front(files, fronts, wanted) == places


# -- a hardened server -------------------------------------------------------------------------------


@dataclass
class Served:
    port: int
    places: Places
    access: Access
    release: threading.Event  # set by the test, awaited on the server's own loop
    busy: list[Request]
    frozen: threading.Event  # set by ``/freeze`` once it blocks the server's loop
    thaw: threading.Event  # set by the test: ``/freeze`` lets the loop go


@pytest.fixture
def serve() -> Iterator:
    """A uvicorn server on a free port, hardened as a front is; ``/quick`` answers at once,
    ``/busy`` once the test sets ``release``; ``/freeze`` blocks the server's whole loop until the
    test sets ``thaw`` (connections made meanwhile wait in the kernel's backlog)."""
    started: list[Servers] = []

    def start(places: int, *, idle: float = 30.0, per_second: float = 0.0) -> Served:
        served: Served

        async def quick(request: Request) -> PlainTextResponse:
            return PlainTextResponse("quick")

        async def busy(request: Request) -> PlainTextResponse:
            served.busy.append(request)
            await asyncio.to_thread(served.release.wait)
            return PlainTextResponse("busy")

        async def freeze(request: Request) -> PlainTextResponse:
            served.frozen.set()
            served.thaw.wait(10.0)  # blocking on purpose: nothing else on this loop runs
            return PlainTextResponse("thawed")

        access = Access(AccessPolicy(), Registry(), RateLimiter(0), RecentPrompts(0), Offenders(per_second), Refusals())
        app = Starlette(routes=[Route("/quick", quick), Route("/busy", busy), Route("/freeze", freeze)])
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        served = Served(port, harden(config, idle=idle, max_connections=places, access=access), access, threading.Event(), [], threading.Event(), threading.Event())
        server = uvicorn.Server(config)
        servers = Servers([server])
        servers.start()
        started.append(servers)
        # Wait for the server's own word that it listens, not for a probe connection: a probe sits
        # in the accept backlog until the busy loop takes it, then counts against uvicorn's limit
        # and the places beside the test's own connections (a held request got 503 so in CI).
        deadline = time.monotonic() + 10.0
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.started and served.places.open == 0 and not server.server_state.connections
        return served

    yield start
    for servers in started:
        servers.stop(grace=0.5)


async def connect(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def status_of(port: int, request: bytes = GET) -> int | None:
    """The status of one request on a new connection; ``None`` if it was closed unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        line = await asyncio.wait_for(reader.readline(), 5.0)
        return int(line.split()[1]) if line else None
    except ConnectionError:
        return None
    finally:
        writer.close()


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5.0) == b""
    except ConnectionError:
        return True




async def test_silent_sockets_past_the_limit_never_keep_a_request_out(serve) -> None:
    served = serve(3)
    silent = await connect(served.port, 10)  # at the limit and past it
    assert await status_of(served.port) == 200
    assert [await closed(reader) for reader, _ in silent[:8]] == [True] * 8  # the oldest made room
    assert served.places.open <= 3
    for _, writer in silent:
        writer.close()


async def test_a_request_accepted_in_a_burst_of_silent_sockets_is_answered(serve) -> None:
    """The loop accepts a whole backlog before it reads any socket: a validator's connection, first
    in a burst of silent ones past the limit, keeps its place because its request waits unread."""
    served = serve(3)
    frozen = asyncio.ensure_future(status_of(served.port, GET.replace(b"/quick", b"/freeze")))
    assert await asyncio.to_thread(served.frozen.wait, 10.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)  # the kernel completes
    writer.write(GET)  # the handshake meanwhile, and keeps the request for the frozen loop
    await writer.drain()
    silent = await connect(served.port, 10)  # after it in the backlog: one burst, it first
    served.thaw.set()
    line = await asyncio.wait_for(reader.readline(), 10.0)
    writer.close()
    assert line.startswith(b"HTTP/1.1 200") and await frozen == 200
    assert served.access.refusals._reasons["a connection that sent nothing, closed for a newcomer"] >= 8
    for _, writer in silent:
        writer.close()


async def test_with_every_place_answering_a_newcomer_gets_503_then_is_served_once_one_is_free(serve) -> None:
    served = serve(2)
    held = [asyncio.ensure_future(status_of(served.port, GET.replace(b"/quick", b"/busy"))) for _ in range(2)]
    await eventually(lambda: len(served.busy) == 2 or any(h.done() for h in held), within=30.0)
    assert not any(h.done() for h in held), [h.result() for h in held if h.done()]  # both held, none refused
    silent = await connect(served.port, 5)  # silent ones never take an answering one's place
    assert await status_of(served.port) == 503
    served.release.set()
    assert await asyncio.gather(*held) == [200, 200]
    assert await status_of(served.port) == 200
    for _, writer in silent:
        writer.close()


async def test_bytes_that_are_not_http_are_refused_counted_and_cut_off_without_a_line_each(serve, caplog) -> None:
    served = serve(100, per_second=5.0)
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        statuses = [await status_of(served.port, JUNK) for _ in range(20)]
    assert statuses[:10] == [400] * 10  # a burst of twice the rate, then closed unread
    assert set(statuses[11:]) == {None}, statuses
    assert not [r for r in caplog.records if "Invalid HTTP request" in r.getMessage()]
    assert served.access.refusals._reasons["bytes that are not an HTTP request"] >= 10
