"""The one drain: a source's tokens -> a queue -> ``send()`` in batches of N, ended before the deadline.

Every answer, whatever produced it, goes through :func:`stream_answer`. It never blocks the event
loop: the source runs as its own task and puts tokens on an ``asyncio.Queue``; a single timer puts
a deadline marker on the same queue, so there is no per-token timeout. Whatever is buffered when
the deadline comes is flushed (a partial answer still earns), then the source is cancelled.
Bittensor ends the HTTP stream itself after the token streamer returns, so this never sends
``more_body: False``: the stream ends exactly once.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, MutableMapping, Sequence

import bittensor as bt
from langchain_core.messages import BaseMessage

from openai_miner.sources.base import TokenSource

Send = Callable[[MutableMapping[str, object]], Awaitable[None]]
Outcome = Literal["complete", "deadline", "error", "disconnected"]


@dataclass(frozen=True)
class StreamResult:
    """What happened to one answer; the miner logs it and tests assert on it."""

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
    send: Send,
    *,
    batch_size: int,
    deadline: float,
) -> StreamResult:
    """Stream ``source``'s answer to ``send`` in batches of exactly ``batch_size`` tokens.

    N tokens become ``ceil(N / batch_size)`` sends, whose text concatenates to the source's.
    Returns at the source's end, at ``deadline`` (after flushing), on a source error (after
    flushing what came before it) or when ``send`` fails because the validator went away.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def run_source() -> None:
        try:
            await source.produce(messages, queue, deadline)  # type: ignore[arg-type]
        except Exception as error:  # the drain reports it; the stream ends cleanly either way
            queue.put_nowait(_Failed(error))
        else:
            queue.put_nowait(_END)

    producer = loop.create_task(run_source())
    timer = loop.call_later(max(0.0, deadline - time.monotonic()), queue.put_nowait, _DEADLINE)
    buffer: list[str] = []
    tokens = sends = 0
    outcome: Outcome = "complete"
    error: BaseException | None = None

    async def flush() -> None:
        nonlocal sends
        body = "".join(buffer).encode("utf-8")
        buffer.clear()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        sends += 1

    try:
        while True:
            item = await queue.get()
            if isinstance(item, str):
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
    except Exception as exc:  # a failed send: the validator is gone, nobody is reading
        outcome, error = "disconnected", exc
        bt.logging.debug(f"stream ended: send failed ({type(exc).__name__}: {exc})")
    finally:
        timer.cancel()
        producer.cancel()
    return StreamResult(outcome=outcome, tokens=tokens, sends=sends, error=error)
