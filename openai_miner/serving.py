"""Every front's uvicorn server on one event loop, in one background thread.

The token sources hold clients bound to the event loop that first used them (the upstream's
connection pool, the local model's hand-back of tokens), so the fronts share one loop: the axon's
server and the HTTP front's server run side by side in it, as two ``uvicorn.Server.serve()``
tasks. Stopping asks each to exit, with a bounded grace for answers in flight.
"""

import asyncio
import threading

import uvicorn


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

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float) -> None:
        """Ask every server to exit; in-flight answers get ``grace`` seconds, then are cancelled."""
        for server in self.servers:
            server.config.timeout_graceful_shutdown = grace
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=grace + 5)
            self._thread = None
