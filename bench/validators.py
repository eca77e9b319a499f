"""The validators: one real ``bt.Dendrite`` per concurrent stream, each with its own hotkey.

One dendrite per stream, as on the network (each validator is its own client, with its own
aiohttp session): a single shared dendrite would also cap concurrency at aiohttp's default of
100 connections. The hotkeys are keypairs from fixed seeds; no wallet files are needed.

A dendrite dials ``0.0.0.0`` when the axon's IP equals its own "external IP"; the dendrites
here are given a label instead, so every request goes to 127.0.0.1 and nowhere else.

One deviation from a stock dendrite: its aiohttp session keeps idle connections for 4 s, not
aiohttp's 15 s. The axon's uvicorn closes idle connections after 5 s, and a dendrite that reuses
one just as the axon closes it gets ``ServerDisconnectedError`` (measured: 266 of 2,560 streams
when requests come 4.5-5 s apart, 0 with the axon's keep-alive raised to 20 s). That race belongs
to the axon's configuration, not to the token path this benchmark measures, so it is kept out.
"""

import hashlib
import time
from dataclasses import dataclass, field

import aiohttp
import bittensor as bt
import bittensor.utils.networking as networking

from openai_miner.protocol import StreamPromptingSynapse


@dataclass
class Stream:
    """One answer as a validator saw it; times are ``time.monotonic()``."""

    marker: str
    started: float
    ended: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # whole tokens received, after each chunk
    text: str = ""
    status: int | None = None
    error: str | None = None


def prompt(marker: str) -> str:
    return f"Count for me, please. [{marker}]"


KEEPALIVE_SECONDS = 4.0  # below uvicorn's 5 s: see the module's docstring


class Validators:
    """Dendrites made on first use (inside the event loop); :meth:`close` them in the same loop."""

    def __init__(self) -> None:
        self._dendrites: list[bt.Dendrite] = []

    def dendrite(self, index: int) -> bt.Dendrite:
        while len(self._dendrites) <= index:
            seed = hashlib.sha256(f"bench-validator-{len(self._dendrites)}".encode()).hexdigest()
            keypair = bt.Keypair.create_from_seed("0x" + seed)
            original = networking.get_external_ip
            networking.get_external_ip = lambda: "127.0.0.1"  # the public-IP lookup, answered locally
            try:
                dendrite = bt.Dendrite(wallet=keypair)
            finally:
                networking.get_external_ip = original
            dendrite.external_ip = "bench-validator"  # not the axon's IP: dial 127.0.0.1, not 0.0.0.0
            dendrite._session = aiohttp.ClientSession(  # what ``Dendrite.session`` makes, but for the keep-alive
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_SECONDS)
            )
            self._dendrites.append(dendrite)
        return self._dendrites[index]

    async def ask(self, index: int, axon: object, marker: str, timeout: float, message: str | None = None) -> Stream:
        """Ask for one streamed answer (``message``, by default the marked prompt); every chunk timed."""
        dendrite = self.dendrite(index)
        synapse = StreamPromptingSynapse(roles=["user"], messages=[message or prompt(marker)])
        stream = Stream(marker=marker, started=time.monotonic())
        parts: list[str] = []
        tokens = 0
        try:
            async for item in dendrite.call_stream(axon, synapse, timeout=timeout, deserialize=False):
                now = time.monotonic()
                if isinstance(item, StreamPromptingSynapse):
                    status = item.dendrite.status_code if item.dendrite else None
                    stream.status = int(status) if status is not None else None
                    if stream.status != 200:
                        stream.error = item.dendrite.status_message if item.dendrite else "no status"
                    continue
                parts.append(item)
                tokens += item.count(" ")  # every word of the upstream's answer ends in a space
                stream.chunk_times.append(now)
                stream.chunk_tokens.append(tokens)
        except Exception as error:  # counted as an error of the run, never raised
            stream.error = f"{type(error).__name__}: {error}"
        stream.ended = time.monotonic()
        stream.text = "".join(parts)
        return stream

    async def close(self) -> None:
        for dendrite in self._dendrites:
            await dendrite.aclose_session()
