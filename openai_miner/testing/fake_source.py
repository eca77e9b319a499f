"""A scripted token source: the test double every miner test injects instead of monkeypatching."""

import asyncio
from typing import Sequence

from openai_miner.messages import Message
from openai_miner.sources.base import DEFAULT_SAMPLING, Sampling, Token, UpstreamError


def fake_token(text: str, top: int) -> Token:
    """``text`` with log-probabilities, for requests that ask for them: -0.5 for it, then
    ``top - 1`` alternatives ``alt1``, ``alt2``... each less likely."""
    alternatives = ((text, -0.5), *((f"alt{rank}", -0.5 - rank) for rank in range(1, top)))
    return Token(text, -0.5, alternatives[:top])


class FakeSource:
    """Emits ``tokens`` every ``interval`` seconds, optionally failing after ``fail_after`` tokens.

    It records what it was asked (``seen``: the messages, ``sampling``: each request's settings)
    and how each answer ended (``finished``, ``cancelled``).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        interval: float = 0.0,
        *,
        fail_after: int | None = None,
        name: str = "fake",
    ) -> None:
        self.name = name  # what an answer's result names as its source: two fakes behind a fallback differ
        self.tokens = list(tokens)
        self.interval = interval
        self.fail_after = fail_after
        self.seen: list[list[Message]] = []
        self.sampling: list[Sampling] = []
        self.cancelled = 0
        self.finished = 0

    def describe(self) -> str:
        return self.name

    def models(self) -> frozenset[str]:
        return frozenset({self.name})

    async def produce(
        self,
        messages: Sequence[Message],
        queue: "asyncio.Queue[str | Token]",
        deadline: float,
        sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        self.seen.append(list(messages))
        self.sampling.append(sampling)
        try:
            for index, token in enumerate(self.tokens):
                if self.fail_after is not None and index == self.fail_after:
                    raise UpstreamError(f"scripted failure after {index} tokens")
                if self.interval:
                    await asyncio.sleep(self.interval)
                queue.put_nowait(token if sampling.top_logprobs is None else fake_token(token, sampling.top_logprobs))
            if self.fail_after is not None and self.fail_after >= len(self.tokens):
                raise UpstreamError("scripted failure at the end")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
