"""Which source answers: the upstream while it works, the local model when it does not.

An answer never mixes two models: the local model takes over only if the upstream failed before
its first token; a failure after that ends the stream with what was sent. A circuit breaker stops
paying the upstream's timeouts and retries while it is down: after ``failures`` consecutive
failures, requests go straight to the local model for ``cooldown`` seconds, then one request
probes the upstream again. Each switch is logged once. While the upstream is closed (its daily
token budget spent) the local model answers without asking it. A :class:`NoAnswer` (a refused or empty
answer) is answered locally too, but proves the upstream up rather than down. Which of the two
answers goes on the queue as an :class:`~openai_miner.sources.base.Answering`, for the answer's result.
"""

import asyncio
import time
from collections import Counter
from typing import Callable, Sequence

import bittensor as bt

from openai_miner.messages import Message
from openai_miner.sources.base import (
    DEFAULT_SAMPLING,
    Answering,
    Closed,
    Item,
    NoAnswer,
    Sampling,
    TokenSource,
    UpstreamError,
    closed,
)


class CircuitBreaker:
    """Closed (upstream used), open (skipped until the cooldown ends), half-open (one probe)."""

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = max(1, failures)
        self.cooldown = cooldown
        self._clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False

    def abandon(self) -> None:
        """A probe given up (cancelled) proves nothing either way: let the next request probe."""
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing else "open"

    def allow(self) -> bool:
        """May this request try the upstream? In half-open state only one at a time may."""
        if self.opened_at is None:
            return True
        if self.probing or self._clock() - self.opened_at < self.cooldown:
            return False
        self.probing = True
        bt.logging.info("probing the upstream again after its cooldown")
        return True

    def success(self) -> None:
        if self.opened_at is not None:
            bt.logging.info("upstream recovered: answering from it again")
        self.consecutive, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing or (self.opened_at is None and self.consecutive >= self.threshold):
            bt.logging.warning(
                f"upstream failed {self.consecutive} times in a row: answering locally for "
                f"{self.cooldown:g}s before probing it again"
            )
            self.opened_at, self.probing = self._clock(), False


class _Counted:
    """The queue as the upstream sees it: counts what it put, so we know if it started answering."""

    def __init__(self, queue: "asyncio.Queue[Item]") -> None:
        self._queue = queue
        self.count = 0
        self.started = asyncio.Event()

    def put_nowait(self, token: Item) -> None:
        self.count += 1
        self.started.set()
        self._queue.put_nowait(token)


class Stalled(UpstreamError):
    """The upstream took the request and sent no first token within its share of the deadline."""


def count_error(source: TokenSource, kind: str) -> None:
    """Add a failure the source itself never saw (it was cancelled) to its own count by kind, for
    the metrics (``openai_miner_upstream_errors_total``), when it keeps one."""
    errors = getattr(source, "errors", None)
    if isinstance(errors, Counter):
        errors[kind] += 1


class FallbackSource:
    """A :class:`TokenSource` trying ``primary`` (if any) and answering from ``local`` when it fails."""

    name = "fallback"

    def __init__(
        self,
        primary: TokenSource | None,
        local: TokenSource | None,
        breaker: CircuitBreaker,
        note: str = "",
        first_token_share: float = 0.5,
    ) -> None:
        if primary is None and local is None:
            raise ValueError("no token source: set OPENAI_API_KEY or enable the local fallback")
        self.primary = primary
        self.local = local
        self.breaker = breaker
        self.first_token_share = first_token_share
        self.note = note  # said after the description: why the local model answers, or a failed load

    def members(self) -> list[TokenSource]:
        """The sources that may answer, the upstream first."""
        return [source for source in (self.primary, self.local) if source is not None]

    @property
    def skipping_upstream(self) -> bool:
        """Whether the circuit breaker now sends requests straight to the local model (open, or
        half-open while one request probes the upstream)."""
        return self.breaker.state != "closed"

    @property
    def loaded(self) -> bool:
        """Whether no answer would wait for a model to load: an upstream needs none, the local model
        may still be loading."""
        return self.primary is not None or bool(getattr(self.local, "loaded", True))

    def models(self) -> frozenset[str]:
        return frozenset().union(*(source.models() for source in self.members()))

    def closed(self) -> str | None:
        """Why nothing can answer now: the upstream is closed (its budget spent) and no local model."""
        if self.local is not None or self.primary is None:
            return None
        return closed(self.primary)

    def close(self) -> None:
        """Stop whatever the local model computes (the miner calls it as it stops)."""
        close = getattr(self.local, "close", None)
        if close is not None:
            close()

    def describe(self) -> str:
        if self.primary is None or self.local is None:
            only = self.primary or self.local
            assert only is not None
            return only.describe() + self.note
        return f"{self.primary.describe()}, falling back to {self.local.describe()}{self.note}"

    async def produce(
        self,
        messages: Sequence[Message],
        queue: "asyncio.Queue[Item]",
        deadline: float,
        sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        if self.primary is not None and (
            self.local is None or (closed(self.primary) is None and self.breaker.allow())
        ):
            queue.put_nowait(Answering(self.primary.name))
            counted = _Counted(queue)
            try:
                await self._from_primary(self.primary, messages, counted, deadline, sampling)
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            except Exception as error:
                if isinstance(error, Closed):
                    self.breaker.abandon()  # not asked: proves nothing either way
                elif isinstance(error, NoAnswer):
                    self.breaker.success()  # it answered: this prompt failed, the upstream did not
                else:
                    self.breaker.failure()
                if isinstance(error, Stalled):
                    count_error(self.primary, "stalled")
                if counted.count or self.local is None or time.monotonic() >= deadline:
                    raise
                bt.logging.warning(f"upstream failed before its first token ({error}); answering locally")
            else:
                self.breaker.success()
                return
        assert self.local is not None
        queue.put_nowait(Answering(self.local.name))
        await self.local.produce(messages, queue, deadline, sampling)

    async def _from_primary(
        self, primary: TokenSource, messages: Sequence[Message], counted: _Counted, deadline: float,
        sampling: Sampling,
    ) -> None:
        """The upstream's answer; with a local model to turn to, :class:`Stalled` if no first token
        comes within ``first_token_share`` of the time left (a hung proxy or server)."""
        answering = asyncio.ensure_future(primary.produce(messages, counted, deadline, sampling))  # type: ignore[arg-type]
        try:
            if self.local is not None:
                patience = self.first_token_share * max(deadline - time.monotonic(), 0.0)
                first = asyncio.ensure_future(counted.started.wait())
                try:
                    await asyncio.wait({answering, first}, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    first.cancel()
                if not answering.done() and not counted.count:
                    raise Stalled(f"no first token from the upstream within {patience:.1f}s")
            await answering
        finally:
            answering.cancel()
