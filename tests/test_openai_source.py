"""The OpenAI source against a loopback OpenAI-compatible server: streaming, retries, deadlines."""

import asyncio
import time

import pytest
from openai_miner.messages import Message

from openai_miner.testing.upstream import Fault, LoopbackUpstream, ToolCall
from openai_miner.sources.base import Sampling, ToolCallDelta, UpstreamError
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.streaming import stream_answer
from tests.helpers import Recorder, collector_paused, leftovers

TOKENS = [f"w{i} " for i in range(25)]
MESSAGES = [Message("system", "be brief"), Message("user", "hello")]


def source(up: LoopbackUpstream, **kwargs) -> OpenAISource:
    model = chat_openai(model="loopback", api_key="sk-test-secret", base_url=up.base_url, max_tokens=64)
    return OpenAISource(model, backoff=0.01, max_backoff=0.05, **kwargs)


async def run(src: OpenAISource, deadline_in: float = 10.0, batch: int = 4):
    send = Recorder()
    result = await stream_answer(src, MESSAGES, send.emit, batch_size=batch, deadline=time.monotonic() + deadline_in)
    return send, result


async def test_streams_every_token_in_batches() -> None:
    with LoopbackUpstream(tokens=TOKENS) as up:
        send, result = await run(source(up))
        body = up.requests[0].body
    assert result.outcome == "complete" and result.tokens == 25
    assert send.text == "".join(TOKENS)
    assert len(send.messages) == 7  # ceil(25 / 4)
    assert body["stream"] is True and body["model"] == "loopback"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == "hello"


async def test_an_answer_starts_no_task_per_token() -> None:
    """A task per chunk (LangChain's per-chunk timer) cost ~15% of the CPU per token."""
    loop = asyncio.get_running_loop()
    started: list[object] = []

    def counting(loop: asyncio.AbstractEventLoop, coro, **kwargs) -> asyncio.Task:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    tokens = [f"w{i} " for i in range(200)]
    with LoopbackUpstream(tokens=tokens) as up:
        src = source(up)
        src.model.max_tokens = 256
        loop.set_task_factory(counting)
        try:
            send, result = await run(src)
        finally:
            loop.set_task_factory(None)
    assert result.tokens == 200 and send.text == "".join(tokens)
    assert len(started) < 20, len(started)


async def test_tokens_are_forwarded_as_they_arrive() -> None:
    with LoopbackUpstream(tokens=TOKENS[:6], interval=0.05) as up:
        send, _ = await run(source(up), batch=1)
        sent = up.requests[0].token_times
    lags = [got - put for got, put in zip(send.times, sent)]
    assert len(lags) == 6 and max(lags) < 0.04  # not buffered until the end (that would be 0.25 s)


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_transient_errors_are_retried(status: int) -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=status, times=2)) as up:
        send, result = await run(source(up, max_retries=2))
        attempts = len(up.requests)
    assert attempts == 3 and result.outcome == "complete" and send.text == "".join(TOKENS)


async def test_retry_after_is_honoured() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=429, retry_after=0.4, times=1)) as up:
        await run(source(up))
        gap = up.requests[1].received_at - up.requests[0].received_at
    assert gap >= 0.4


async def test_retries_stop_before_the_deadline() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=429, retry_after=5)) as up:
        started = time.monotonic()
        send, result = await run(source(up, max_retries=5), deadline_in=1.0)
        elapsed = time.monotonic() - started
        attempts = len(up.requests)
    assert attempts == 1  # a 5 s wait cannot fit in a 1 s budget: give up at once
    assert result.outcome == "error" and send.messages == [] and elapsed < 0.5
    assert "HTTP 429" in str(result.error)


async def test_auth_error_is_not_retried_and_is_log_safe() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=401)) as up:
        _, result = await run(source(up, max_retries=3))
        attempts = len(up.requests)
    assert attempts == 1 and isinstance(result.error, UpstreamError)
    assert "401" in str(result.error) and "sk-test-secret" not in str(result.error)


async def test_connection_refused_is_an_upstream_error() -> None:
    up = LoopbackUpstream(tokens=TOKENS).start()
    up.stop()  # nothing listens there any more
    _, result = await run(source(up, max_retries=1))
    assert result.outcome == "error" and "ConnectionError" in str(result.error)


async def test_mid_stream_drop_is_not_retried_and_keeps_the_text_sent() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(drop_after=6)) as up:
        send, result = await run(source(up, max_retries=3), batch=4)
        attempts = len(up.requests)
    assert attempts == 1  # a retry would repeat text already streamed
    assert result.outcome == "error" and send.text == "".join(TOKENS[:6])


async def test_deadline_closes_the_upstream_request() -> None:
    with LoopbackUpstream(tokens=TOKENS, interval=0.1) as up:
        send, result = await run(source(up), deadline_in=0.45, batch=50)
        for _ in range(100):
            if up.requests[0].disconnected:
                break
            await asyncio.sleep(0.01)
        recorded = up.requests[0]
    assert result.outcome == "deadline" and 2 <= result.tokens <= 5
    assert send.text == "".join(TOKENS[: result.tokens])  # flushed although under one batch
    assert recorded.disconnected and not recorded.finished


async def test_an_answer_cut_anywhere_closes_its_whole_http_stream() -> None:
    """Cut at any point, by its deadline or a hang-up, an answer leaves nothing for the collector.

    A generator left suspended is closed at the garbage collector's next pass, from whatever
    thread that runs in (the local model's, mid-forward); see the next test for what that costs.
    LangChain's per-chunk timer left 77 behind for 40 answers cut by their deadline (a chunk's
    task done, the cut between chunks, and closing the outer iterator does not close those it
    iterates).
    """
    tokens = [f"w{i} " for i in range(400)]
    cuts = [0.02 + 0.01 * i for i in range(40)]  # before the first token, then ever later

    async def hung_up(src: OpenAISource, after: float) -> None:
        answer = asyncio.ensure_future(run(src))
        await asyncio.sleep(after)
        answer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await answer

    with collector_paused(), LoopbackUpstream(tokens=tokens, interval=0.002) as up:
        src = source(up)
        src.model.max_tokens = 512
        results = await asyncio.gather(*(run(src, deadline_in=cut, batch=8) for cut in cuts))
        await asyncio.gather(*(hung_up(src, cut) for cut in cuts))
        left = await leftovers()  # every cancellation delivered, what was let go closed on this loop
    assert [result.outcome for _, result in results] == ["deadline"] * len(cuts)
    assert left == [], sorted(set(left))


@pytest.mark.parametrize(
    "fault",
    [None, Fault(malformed_after=3), Fault(drop_after=3), Fault(status=500), Fault(no_done=True)],
    ids=["complete", "malformed", "dropped", "500", "no-done"],
)
async def test_an_answer_ending_any_way_closes_its_whole_http_stream(fault: Fault | None) -> None:
    """Failed, cut or complete, an answer leaves nothing of its stream to the garbage collector.

    On a chunk it cannot parse, the SDK stops reading where it is, and the error's traceback held
    the stream's nine generators (SSE decoding, httpx, httpcore) for the collector. Closed by a
    collection in another thread while this loop was closing them too, one in a hundred such
    answers ended in ``ValueError: async generator already executing``: the soak's warning.
    """
    with collector_paused(), LoopbackUpstream(tokens=TOKENS, fault=fault) as up:
        await run(source(up, max_retries=0), deadline_in=1.0)  # no-done ends at the deadline
        left = await leftovers()  # every cancellation delivered, what was let go closed on this loop
    assert left == [], sorted(set(left))


async def test_tool_calls_come_as_pieces_and_a_call_alone_is_an_answer() -> None:
    tools = ({"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}},)
    with LoopbackUpstream(tokens=[], tool_calls=[ToolCall("weather", ['{"ci', 'ty": "Paris"}'], id="call_a")]) as up:
        pieces: list = []

        async def emit(batch) -> None:
            pieces.extend(batch)

        result = await stream_answer(
            source(up), MESSAGES, emit, batch_size=1, deadline=time.monotonic() + 10, sampling=Sampling(tools=tools)
        )
        sent = up.requests[0].body
    assert result.outcome == "complete" and result.tokens == 0 and result.finish_reason == "tool_calls"
    assert pieces == [
        ToolCallDelta(0, "call_a", "weather", ""),
        ToolCallDelta(0, None, None, '{"ci'),
        ToolCallDelta(0, None, None, 'ty": "Paris"}'),
    ]
    assert sent["tools"] == list(tools) and "tool_choice" not in sent
