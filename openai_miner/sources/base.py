"""The one small interface every token source implements (like an httpx transport)."""

import asyncio
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from openai_miner.messages import Message


class UpstreamError(RuntimeError):
    """A source could not produce an answer; the message is safe to log (no secrets, no prompt)."""


class NoAnswer(UpstreamError):
    """The source works but gave this prompt no answer: refused it (too long...) or said nothing.

    Another model may still answer it, but it says nothing about the source's health: a validator
    sending prompts over the upstream's context must not trip the circuit breaker for everyone.
    """


class Closed(UpstreamError):
    """The source was not asked: it is closed for now (the upstream's daily budget is spent).

    Like :class:`NoAnswer`, it says nothing of the source's health; another source may answer.
    """


def closed(source: "TokenSource") -> str | None:
    """Why ``source`` cannot answer anything now, or ``None``: a front then refuses with 503 before
    any work. A source that can close says so with a ``closed()`` method of its own (it raises
    :class:`Closed` if asked all the same); most never close."""
    check = getattr(source, "closed", None)
    return check() if check is not None else None


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings, as a front received them; ``None`` keeps the source's own.

    ``top_logprobs`` asks for log-probabilities: each token then arrives as a :class:`Token`
    carrying its own and the ``top_logprobs`` most likely alternatives (0: its own only).
    ``tools`` and ``tool_choice`` are OpenAI's, as the validator sent them: a source passes them on
    untouched (the upstream knows their schema better than we do) and answers a call of one as
    :class:`ToolCallDelta` items.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None


DEFAULT_SAMPLING = Sampling()


@dataclass(frozen=True)
class Token:
    """One token with its log-probability and its most likely alternatives, best first."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the model's call of a tool, as OpenAI streams one.

    The first piece of call ``index`` carries its ``id`` and ``name``; every piece carries a
    fragment of its JSON ``arguments``, kept exactly as the model wrote it (the fragments
    concatenate to the arguments, whether or not they parse).
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class Usage:
    """What an answer cost, in the answering model's own tokens."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finish:
    """A source's last item: why the answer ended (``"stop"``, ``"length"``, ``"tool_calls"``;
    ``None`` when the model did not say) and its :class:`Usage` when known. Never sent as text."""

    reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Answering:
    """A source that hands the answer to another says so, before that one's first item: ``source``
    (its ``name``) answers from here on. The answer's result names it (else the source asked):
    which model answered is what an operator asks after an outage. Never sent as text."""

    source: str


Item = str | Token | ToolCallDelta | Finish | Answering
"""What a source puts on the drain's queue."""


class TokenSource(Protocol):
    """Produces the text of one answer, token by token, onto a queue.

    ``produce`` puts each non-empty token on ``queue`` as soon as it exists and returns when the
    answer is complete: a ``str``, or a :class:`Token` when ``sampling.top_logprobs`` is set; a
    tool call as :class:`ToolCallDelta` pieces; last, once complete, a :class:`Finish`. A source
that delegates (the fallback) puts an :class:`Answering` naming the one it hands the answer to. It
    raises (ideally :class:`UpstreamError`) when it cannot answer. It must stop promptly, releasing
    upstream connections or compute, when its task is cancelled: the drain cancels it at the
    request's deadline or when the validator goes away. ``deadline`` is a ``time.monotonic()``
    instant after which nothing produced will be sent; retries must fit before it.
    ``describe()`` names what answers, for logs and summaries (never a key); ``models()`` the
    model names it serves.
    """

    name: str

    async def produce(
        self,
        messages: Sequence[Message],
        queue: "asyncio.Queue[Item]",
        deadline: float,
        sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None: ...

    def describe(self) -> str: ...

    def models(self) -> frozenset[str]:
        """The model names this source answers as (what ``/availability`` reports available)."""
        ...
