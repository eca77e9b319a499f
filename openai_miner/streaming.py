"""The one drain: a source's tokens -> a queue -> a front's emitter in batches of N, ended before the deadline.

Every answer, whatever produced it and whichever front asked, goes through :func:`stream_answer`. It never blocks the event
loop: the source runs as its own task and puts tokens on an ``asyncio.Queue``; a single timer puts
a deadline marker on the same queue, so there is no per-token timeout. Whatever is buffered when
the deadline comes is flushed (a partial answer still earns), then the source is cancelled.
The drain decides when a batch goes out; the front's :data:`Emit` decides its bytes (the axon's
``send()`` of the text, an SSE chunk of the HTTP front), and ends the stream itself.
A tool call's pieces travel in the batches beside the text but are not counted as tokens; the
source's :class:`~openai_miner.sources.base.Finish` is never emitted: its finish reason and usage
end up in the :class:`StreamResult`, and so does the name of the source that answered (the
source's own, or the one an :class:`~openai_miner.sources.base.Answering` named).
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Sequence

import bittensor as bt
from openai_miner.messages import Message
from openai_miner.sources.base import (
    DEFAULT_SAMPLING,
    Answering,
    Finish,
    Sampling,
    Token,
    TokenSource,
    ToolCallDelta,
    Usage,
)

Piece = str | Token | ToolCallDelta
"""What a batch holds: text, a token with its log-probabilities, a piece of a tool call."""
Emit = Callable[[Sequence[Piece]], Awaitable[None]]
"""Writes one batch of tokens to the caller; raises when the caller is gone."""
Outcome = Literal["complete", "deadline", "error", "disconnected"]


def text_of(batch: Sequence[Piece]) -> str:
    """The text of a batch, whether its tokens carry log-probabilities or not; tool calls are no text."""
    return "".join(item if isinstance(item, str) else item.text if isinstance(item, Token) else "" for item in batch)


def tool_calls_of(batch: Sequence[Piece]) -> list[ToolCallDelta]:
    """The batch's tool-call pieces, each run of pieces of one call joined into one (arguments
    concatenated byte for byte; the first piece's ``id`` and ``name`` kept)."""
    joined: list[ToolCallDelta] = []
    for item in batch:
        if not isinstance(item, ToolCallDelta):
            continue
        last = joined[-1] if joined else None
        if last is not None and last.index == item.index:
            joined[-1] = ToolCallDelta(last.index, last.id or item.id, last.name or item.name, last.arguments + item.arguments)
        else:
            joined.append(item)
    return joined


@dataclass(frozen=True)
class StreamResult:
    """What happened to one answer; the core logs it and tests assert on it.

    ``tokens`` counts text only. ``finish_reason`` is the source's own when it completed
    (``"tool_calls"`` when it called a tool and did not say), else ``None``: the front words
    a cut-short answer itself. ``usage`` is the source's count, when it gave one. ``source`` names
    the source that answered (or failed to), e.g. ``"openai"`` or ``"local"`` behind the fallback.
    ``first_chunk``: seconds from the drain's start to the first batch handed to the caller
    (``None``: none was), what a validator's time-to-first-token sees of the miner.
    """

    outcome: Outcome
    tokens: int
    sends: int
    source: str
    error: BaseException | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    first_chunk: float | None = None


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
    messages: Sequence[Message],
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
    started = time.monotonic()
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
    buffer: list[Piece] = []
    tokens = sends = 0
    outcome: Outcome = "complete"
    error: BaseException | None = None
    finish = Finish()
    called = False
    answering = source.name
    first_chunk: float | None = None

    async def flush() -> None:
        nonlocal sends, first_chunk
        batch = buffer.copy()
        buffer.clear()
        await emit(batch)
        if sends == 0:
            first_chunk = time.monotonic() - started
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
            if isinstance(item, ToolCallDelta):  # sent like a token, not counted as one
                buffer.append(item)
                called = True
                if len(buffer) == batch_size:
                    await flush()
                continue
            if isinstance(item, Finish):
                finish = item
                continue
            if isinstance(item, Answering):
                answering = item.source
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
    reason = (finish.reason or ("tool_calls" if called else None)) if outcome == "complete" else None
    return StreamResult(
        outcome, tokens, sends, answering, error, finish_reason=reason, usage=finish.usage, first_chunk=first_chunk
    )
