"""The one drain: a source's tokens -> a queue -> a front's emitter in batches of N, ended before the deadline.

Every answer, whatever produced it and whichever front asked, goes through :func:`stream_answer`. It never blocks the event
loop: the source runs as its own task and puts tokens on an ``asyncio.Queue``; a single timer puts
a deadline marker on the same queue, so there is no per-token timeout. Whatever is buffered when
the deadline comes is flushed (a partial answer still earns), then the source is cancelled.
The drain decides when a batch goes out; the front's :data:`Emit` decides its bytes (the axon's
``send()`` of the text, an SSE chunk of the HTTP front), and ends the stream itself.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Sequence

import bittensor as bt
from langchain_core.messages import BaseMessage

from openai_miner.sources.base import DEFAULT_SAMPLING, Sampling, Token, TokenSource

Emit = Callable[[Sequence["str | Token"]], Awaitable[None]]
"""Writes one batch of tokens to the caller; raises when the caller is gone."""
Outcome = Literal["complete", "deadline", "error", "disconnected"]


def text_of(batch: Sequence["str | Token"]) -> str:
    """The text of a batch, whether its tokens carry log-probabilities or not."""
    return "".join(item if isinstance(item, str) else item.text for item in batch)


@dataclass(frozen=True)
class StreamResult:
    """What happened to one answer; the core logs it and tests assert on it."""

    outcome: Outcome
    tokens: int
    sends: int
    error: BaseException | None = None


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()
_DEADLINE = object()


def stream_deadline(timeout: float | None, *, now: float, margin: float) -> float:
    """When to stop sending: ``margin`` seconds (at most a quarter of the timeout) before it ends.

    The validator's timeout covers the whole stream, network included, so the last batch must
    leave the miner a little before the timeout itself.
    """
    budget = timeout if timeout and timeout > 0 else 12.0
    return now + budget - min(margin, budget / 4)


async def stream_answer(
    source: TokenSource,
    messages: Sequence[BaseMessage],
    emit: Emit,
    *,
    batch_size: int,
    deadline: float,
    sampling: Sampling = DEFAULT_SAMPLING,
) -> StreamResult:
    """Stream ``source``'s answer to ``emit`` in batches of exactly ``batch_size`` tokens.

    N tokens become ``ceil(N / batch_size)`` emits, whose text concatenates to the source's.
    Returns at the source's end, at ``deadline`` (after flushing), on a source error (after
    flushing what came before it) or when ``emit`` fails because the validator went away.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def run_source() -> None:
        try:
            await source.produce(messages, queue, deadline, sampling)  # type: ignore[arg-type]
        except Exception as error:  # the drain reports it; the stream ends cleanly either way
            queue.put_nowait(_Failed(error))
        else:
            queue.put_nowait(_END)

    producer = loop.create_task(run_source())
    timer = loop.call_later(max(0.0, deadline - time.monotonic()), queue.put_nowait, _DEADLINE)
    buffer: list[str | Token] = []
    tokens = sends = 0
    outcome: Outcome = "complete"
    error: BaseException | None = None

    async def flush() -> None:
        nonlocal sends
        batch = buffer.copy()
        buffer.clear()
        await emit(batch)
        sends += 1

    try:
        while True:
            item = await queue.get()
            if isinstance(item, (str, Token)):
                buffer.append(item)
                tokens += 1
                if len(buffer) == batch_size:
                    await flush()
                continue
            if item is _DEADLINE:
                outcome = "deadline"
            elif isinstance(item, _Failed):
                outcome, error = "error", item.error
            break
        if buffer:
            await flush()
    except Exception as exc:  # a failed emit: the validator is gone, nobody is reading
        outcome, error = "disconnected", exc
        bt.logging.debug(f"stream ended: emit failed ({type(exc).__name__}: {exc})")
    finally:
        timer.cancel()
        producer.cancel()
    return StreamResult(outcome=outcome, tokens=tokens, sends=sends, error=error)
