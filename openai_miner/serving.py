"""Every front's uvicorn server on one event loop, in one background thread.

The token sources hold clients bound to the event loop that first used them (the upstream's
connection pool, the local model's hand-back of tokens), so the fronts share one loop: the axon's
server and the HTTP front's server run side by side in it, as two ``uvicorn.Server.serve()``
tasks. Stopping asks each to exit, with a bounded grace for answers in flight.
"""

import asyncio
import resource
import threading

import bittensor as bt
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol


class IdleClosing(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, also closing a connection that sends nothing at all.

    uvicorn times out idle keep-alive connections only after a first response: a client that
    connects and stays silent would hold a file descriptor forever, and enough of them lock
    validators out. The same keep-alive timer now starts when the connection opens; the first
    bytes cancel it, as they cancel it between requests.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def harden(config: uvicorn.Config, *, idle: float, max_connections: int) -> None:
    """Close silent connections after ``idle`` seconds; over ``max_connections`` at once, answer 503."""
    config.http = IdleClosing
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
