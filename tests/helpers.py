"""What several test modules share: an ASGI send that records, and the fault tests' vocabulary."""

import asyncio
import gc
import os
import re
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx

from openai_miner.fronts.axon import body_chunks
from openai_miner.streaming import Emit
from openai_miner.testing.process import miner_env

if TYPE_CHECKING:
    from openai_miner.miner import OpenAIMiner
    from openai_miner.sources.local import LocalSource

DEVICE = os.environ.get("OPENAI_MINER_TEST_DEVICE", "cpu")
"""Where the local-model tests run: the CPU here and in CI; ``bench/gpu_check.sh`` sets ``cuda``."""
TOKENS = [f"u{i} " for i in range(20)]
"""The upstream's answer in the fault tests: words the tiny local model cannot say."""
UPSTREAM_WORD = re.compile(r"\bu\d+\b")
FULL = "".join(TOKENS)


class Recorder:
    """An ASGI ``send`` that remembers every message and when it came."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.messages: list[dict] = []
        self.times: list[float] = []
        self.fail_on = fail_on

    async def __call__(self, message: dict) -> None:
        if self.fail_on is not None and len(self.messages) == self.fail_on:
            raise OSError("client disconnected")
        self.messages.append(message)
        self.times.append(time.monotonic())

    @property
    def emit(self) -> Emit:
        """The drain's emitter writing to this ``send``, as the axon front's does."""
        return body_chunks(self)

    @property
    def text(self) -> str:
        return b"".join(m["body"] for m in self.messages).decode()


@dataclass
class Http:
    """A miner's HTTP front as a test asks it: through its app in-process, or on its port."""

    miner: "OpenAIMiner"
    transport: httpx.AsyncBaseTransport | None  # None: over 127.0.0.1

    @property
    def base_url(self) -> str:
        return "http://miner" if self.transport else f"http://127.0.0.1:{self.miner.config.http.port}"

    def raw(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, base_url=self.base_url)

    def signing(self, wallet: Any) -> httpx.AsyncClient:
        """A client signing as ``wallet``'s hotkey for this miner (paths relative to the front)."""
        from openai_miner.testing.validator import signing_client

        client = signing_client(wallet.hotkey, self.miner.wallet.hotkey.ss58_address, transport=self.transport)
        client.base_url = httpx.URL(self.base_url)
        return client

    def openai(self, wallet: Any, **kwargs: Any) -> Any:
        """The openai SDK asking this front as ``wallet``'s validator."""
        from openai_miner.testing.validator import openai_client

        to = self.transport or self.miner.config.http.port
        return openai_client(to, wallet.hotkey, self.miner.wallet.hotkey.ss58_address, **kwargs)


STARTED: list = []  # local sources whose batch threads conftest stops after each test


def local_source(model: str, **kwargs: Any) -> "LocalSource":
    """A loaded local source on :data:`DEVICE`, greedy unless told otherwise."""
    from openai_miner.sources.local import LocalSource

    kwargs.setdefault("temperature", 0)
    local = LocalSource(model, device=DEVICE, **kwargs)
    local.load()
    STARTED.append(local)
    return local


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a real ``openai-miner`` process in a test: its own HOME, nothing of ours."""
    return miner_env(tmp_path / "home")


def far() -> float:
    return time.monotonic() + 30


def local_flags(tiny_model: str, *extra: str) -> tuple[str, ...]:
    """The tiny local model as fallback, loaded at start so no answer pays for the load."""
    return (
        "--fallback.model", tiny_model, "--fallback.device", "cpu", "--fallback.preload", "true",
        "--fallback.max_new_tokens", "12", *extra,
    )


async def eventually(condition: Callable[[], bool], within: float) -> float:
    """Seconds until ``condition`` held; fails the test if it does not within ``within`` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "condition not met in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def gauge(miner: Any, name: str) -> float | None:
    """A gauge of the miner's own metrics (what ``/metrics`` serves), read without a scrape."""
    return miner.core.metrics.registry.get_sample_value(name)


def fallback_active(miner: Any) -> bool:
    """Whether the circuit breaker skips the upstream now (``openai_miner_fallback_active``)."""
    return gauge(miner, "openai_miner_fallback_active") == 1


def local_generating(miner: Any) -> int:
    """Requests the local model generates for now (``openai_miner_local_generating``)."""
    return int(gauge(miner, "openai_miner_local_generating") or 0)


def model_loaded(messages: list[str], model: str) -> bool:
    """Whether the log (caplog's messages, bittensor's logger at INFO) says ``model`` loaded."""
    return any(message.startswith(f"loaded {model} on ") for message in messages)


def is_upstream_prefix(text: str) -> bool:
    """Whole upstream tokens, in order, and nothing else (in particular no local text after them)."""
    return FULL.startswith(text) and text.count(" ") == len(text.split())


def is_local(text: str) -> bool:
    return bool(text.strip()) and UPSTREAM_WORD.search(text) is None


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside (after one to start clean): what an answer leaves
    to the collector stays there, for :func:`unfinished_http_generators` to count."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


HTTP_STACK = ("openai", "httpx", "httpcore", "langchain_openai", "langchain_core")


def unfinished_http_generators() -> list[str]:
    """Async generators of the upstream's HTTP stack that were started and never finished.

    Nothing closes such a generator but the garbage collector, at its next pass, from whatever
    thread that pass runs in. (``type() is``, not ``isinstance``: that would touch torch's
    deprecated module attributes, which warn.)
    """
    return [
        found.__qualname__
        for found in gc.get_objects()
        if type(found) is types.AsyncGeneratorType
        and found.ag_frame is not None
        and found.ag_frame.f_lasti >= 0
        and found.ag_frame.f_globals.get("__name__", "").split(".")[0] in HTTP_STACK
    ]


async def leftovers(within: float = 2.0) -> list[str]:
    """The HTTP stream generators still unfinished once what is in flight has ended and what was
    let go has been closed (polled, up to ``within`` seconds): only the collector would close these."""
    deadline = time.monotonic() + within
    while (left := unfinished_http_generators()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return left
