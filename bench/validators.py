"""The validators: one real ``bt.Dendrite`` per concurrent stream, each with its own hotkey.

One dendrite per stream, as on the network (each validator is its own client, with its own
aiohttp session): a single shared dendrite would also cap concurrency at aiohttp's default of
100 connections. The hotkeys are keypairs from fixed seeds; no wallet files are needed. Each
question goes through the test kit's :func:`~openai_miner.testing.validator.ask`.

A dendrite dials ``0.0.0.0`` when the axon's IP equals its own "external IP"; the dendrites
here are given a label instead, so every request goes to 127.0.0.1 and nowhere else.

One deviation from a stock dendrite: its aiohttp session keeps idle connections for 4 s, not
aiohttp's 15 s. The axon's uvicorn closes idle connections after 5 s, and a dendrite that reuses
one just as the axon closes it gets ``ServerDisconnectedError`` (measured: 266 of 2,560 streams
when requests come 4.5-5 s apart, 0 with the axon's keep-alive raised to 20 s). That race belongs
to the axon's configuration, not to the token path this benchmark measures, so it is kept out.
"""

import hashlib

import aiohttp
import bittensor as bt

from openai_miner.testing.localnet import offline_ip
from openai_miner.testing.validator import Answer, ask


def prompt(marker: str) -> str:
    return f"Count for me, please. [{marker}]"


def tokens_so_far(answer: Answer) -> list[int]:
    """Whole upstream words received after each chunk (every word of the answer ends in a space)."""
    counts, total = [], 0
    for chunk in answer.chunks:
        total += chunk.count(" ")
        counts.append(total)
    return counts


def keypair(name: str) -> bt.Keypair:
    """A fixed hotkey for a benchmark client (``"validator-0"``, ``"stranger"``), from its name's hash."""
    return bt.Keypair.create_from_seed("0x" + hashlib.sha256(f"bench-{name}".encode()).hexdigest())


KEEPALIVE_SECONDS = 4.0  # below uvicorn's 5 s: see the module's docstring


class Validators:
    """Dendrites made on first use (inside the event loop); :meth:`close` them in the same loop."""

    def __init__(self) -> None:
        self._dendrites: list[bt.Dendrite] = []

    def dendrite(self, index: int) -> bt.Dendrite:
        while len(self._dendrites) <= index:
            with offline_ip():
                dendrite = bt.Dendrite(wallet=keypair(f"validator-{len(self._dendrites)}"))
            dendrite.external_ip = "bench-validator"  # not the axon's IP: dial 127.0.0.1, not 0.0.0.0
            dendrite._session = aiohttp.ClientSession(  # what ``Dendrite.session`` makes, but for the keep-alive
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_SECONDS)
            )
            self._dendrites.append(dendrite)
        return self._dendrites[index]

    async def ask(self, index: int, axon: bt.AxonInfo, marker: str, timeout: float, message: str | None = None) -> Answer:
        """Ask for one streamed answer (``message``, by default the marked prompt), labelled ``marker``."""
        return await ask(
            self.dendrite(index), axon, ["user"], [message or prompt(marker)], timeout, label=marker
        )

    async def close(self) -> None:
        for dendrite in self._dendrites:
            await dendrite.aclose_session()
