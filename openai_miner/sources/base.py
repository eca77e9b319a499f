"""The one small interface every token source implements (like an httpx transport)."""

import asyncio
from typing import Protocol, Sequence

from langchain_core.messages import BaseMessage


class UpstreamError(RuntimeError):
    """A source could not produce an answer; the message is safe to log (no secrets, no prompt)."""


class NoAnswer(UpstreamError):
    """The source works but gave this prompt no answer: refused it (too long...) or said nothing.

    Another model may still answer it, but it says nothing about the source's health: a validator
    sending prompts over the upstream's context must not trip the circuit breaker for everyone.
    """


class TokenSource(Protocol):
    """Produces the text of one answer, token by token, onto a queue.

    ``produce`` puts each non-empty token on ``queue`` as soon as it exists and returns when the
    answer is complete. It raises (ideally :class:`UpstreamError`) when it cannot answer. It must
    stop promptly, releasing upstream connections or compute, when its task is cancelled: the drain
    cancels it at the request's deadline or when the validator goes away. ``deadline`` is a
    ``time.monotonic()`` instant after which nothing produced will be sent; retries must fit before it.
    """

    name: str

    async def produce(
        self, messages: Sequence[BaseMessage], queue: "asyncio.Queue[str]", deadline: float
    ) -> None: ...
