"""The loopback upstream, driven by the real openai SDK: what it streams, when, how it fails."""

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from openai_miner.testing.upstream import Fault, LoopbackUpstream, ToolCall, usage

TOKENS = ["Hello", ",", " world", "!"]
MESSAGES = [{"role": "user", "content": "say hello"}]


def client(up: LoopbackUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.base_url, api_key="test", max_retries=0)


async def stream_contents(up: LoopbackUpstream, received: list[str], **kwargs: object) -> None:
    """Append each content token of one streamed completion to ``received`` as it arrives."""
    async with client(up) as api:
        stream = await api.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, **kwargs
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_stream_is_openai_chunks_in_order() -> None:
    with LoopbackUpstream(tokens=TOKENS) as up:
        async with client(up) as api:
            stream = await api.chat.completions.create(
                model="gpt-test",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:-2]] == TOKENS
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(TOKENS)
    assert {c.model for c in chunks} == {"gpt-test"} and len({c.id for c in chunks}) == 1
    [record] = up.requests
    assert record.body["messages"] == MESSAGES and record.headers["authorization"] == "Bearer test"
    assert record.finished and not record.disconnected
    assert len(record.token_times) == len(TOKENS)
    assert record.received_at <= record.token_times[0] and record.token_times[-1] <= record.ended_at


async def test_non_streaming_returns_the_joined_text_and_models_lists_one() -> None:
    with LoopbackUpstream(tokens=TOKENS) as up:
        async with client(up) as api:
            completion = await api.chat.completions.create(model="m", messages=MESSAGES)
            models = await api.models.list()
    assert completion.choices[0].message.content == "Hello, world!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert [model.id for model in models.data] == ["loopback"]
    assert up.requests[0].finished


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
CALLS = [ToolCall("weather", ['{"city"', ': "Paris"}'], id="call_a"), ToolCall("time", ["{}"], id="call_b")]


async def test_offered_tools_it_streams_its_calls_as_openai_splits_them() -> None:
    with LoopbackUpstream(tokens=["Let me look."], tool_calls=CALLS) as up:
        async with client(up) as api:
            stream = await api.chat.completions.create(
                model="m", messages=MESSAGES, tools=TOOLS, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
    pieces = [(p.index, p.id, p.function.name, p.function.arguments) for c in chunks if c.choices for p in c.choices[0].delta.tool_calls or ()]
    assert pieces == [
        (0, "call_a", "weather", ""), (0, None, None, '{"city"'), (0, None, None, ': "Paris"}'),
        (1, "call_b", "time", ""), (1, None, None, "{}"),
    ]
    assert chunks[1].choices[0].delta.content == "Let me look."  # the text comes first
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.model_dump(exclude_none=True) == usage({"messages": MESSAGES}, 1 + 3)


async def test_offered_tools_a_whole_answer_has_message_tool_calls() -> None:
    with LoopbackUpstream(tokens=[], tool_calls=lambda body: CALLS[:1]) as up:
        async with client(up) as api:
            completion = await api.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("call_a", "weather", '{"city": "Paris"}')
    ]
    assert completion.usage.completion_tokens == 2


async def test_without_tools_offered_it_calls_none() -> None:
    with LoopbackUpstream(tokens=TOKENS, tool_calls=CALLS) as up:
        async with client(up) as api:
            completion = await api.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.tool_calls is None and completion.choices[0].finish_reason == "stop"


async def test_max_tokens_truncate_and_tokens_may_depend_on_the_request() -> None:
    with LoopbackUpstream(tokens=lambda body: body["messages"][-1]["content"].split()) as up:
        received: list[str] = []
        await stream_contents(up, received, max_tokens=1)
        async with client(up) as api:
            completion = await api.chat.completions.create(
                model="m", messages=MESSAGES, max_completion_tokens=2
            )
    assert received == ["say"]
    assert completion.choices[0].message.content == "sayhello"


async def test_tokens_are_paced_by_first_token_delay_and_interval() -> None:
    n, interval, delay = 20, 0.01, 0.05
    with LoopbackUpstream(tokens=["x"] * n, interval=interval, first_token_delay=delay) as up:
        await stream_contents(up, [])
    [record] = up.requests
    times = record.token_times
    assert len(times) == n and all(a < b for a, b in zip(times, times[1:]))
    assert times[0] - record.received_at >= delay
    assert times[-1] - times[0] >= 0.8 * (n - 1) * interval


async def test_status_fault_is_an_openai_error_with_retry_after() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=429, retry_after=2)) as up:
        with pytest.raises(openai.RateLimitError) as caught:
            await stream_contents(up, [])
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.code == "rate_limit_exceeded"
    assert up.requests[0].finished and up.requests[0].token_times == []


async def test_fault_times_fails_the_first_requests_only() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=500, times=1)) as up:
        with pytest.raises(openai.InternalServerError):
            await stream_contents(up, [])
        received: list[str] = []
        await stream_contents(up, received)
    assert received == TOKENS


async def test_delay_before_headers_holds_the_response() -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(delay_before_headers=0.1)) as up:
        await stream_contents(up, [])
    [record] = up.requests
    assert record.token_times[0] - record.received_at >= 0.1


async def test_drop_after_cuts_the_stream_after_exactly_n_tokens() -> None:
    with LoopbackUpstream(tokens=["a", "b", "c", "d", "e"], fault=Fault(drop_after=3)) as up:
        received: list[str] = []
        with pytest.raises(openai.APIConnectionError):
            await stream_contents(up, received)
    assert received == ["a", "b", "c"]
    [record] = up.requests
    assert len(record.token_times) == 3 and not record.finished and not record.disconnected


async def test_malformed_after_sends_a_line_that_is_not_json() -> None:
    with LoopbackUpstream(tokens=["a", "b", "c"], fault=Fault(malformed_after=2)) as up:
        received: list[str] = []
        with pytest.raises(ValueError):
            await stream_contents(up, received)
    assert received == ["a", "b"]


@pytest.mark.parametrize(
    ("fault", "n", "interval", "read"),
    [(None, 3, 0.5, 1), (None, 100_000, 0.0, 1), (Fault(no_done=True), 3, 0.0, 3)],
    ids=["between-tokens", "while-writing", "idle-without-done"],
)
async def test_client_leaving_early_is_recorded_as_disconnected(
    fault: Fault | None, n: int, interval: float, read: int
) -> None:
    with LoopbackUpstream(tokens=["x"] * n, interval=interval, fault=fault) as up:
        async with client(up) as api:
            stream = await api.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            contents = 0
            async for chunk in stream:
                contents += bool(chunk.choices[0].delta.content)
                if contents == read:
                    break
            await stream.close()
        await eventually(lambda: up.requests[0].disconnected)
        record = up.requests[0]
        assert not record.finished and record.ended_at is not None
        assert len(record.token_times) >= read


async def test_stop_is_quick_with_a_stream_left_hanging() -> None:
    up = LoopbackUpstream(tokens=TOKENS, fault=Fault(no_done=True)).start()
    received: list[str] = []
    reader = asyncio.create_task(stream_contents(up, received))
    await eventually(lambda: len(received) == len(TOKENS))
    await asyncio.sleep(0.05)
    assert not reader.done() and not up.requests[0].finished
    started = time.monotonic()
    up.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(openai.APIConnectionError):
        await reader  # the server closed the connection without finishing the stream
    record = up.requests[0]
    assert record.ended_at is not None and not record.finished and not record.disconnected
    up.stop()  # idempotent


def test_cli_serves_until_interrupted() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "openai_miner.testing.upstream", "--tokens", "Hi", " there"],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    ) as cli:
        try:
            assert cli.stdout is not None
            base_url = cli.stdout.readline().strip()
            body = {"model": "m", "messages": MESSAGES}
            reply = httpx.post(f"{base_url}/chat/completions", json=body)
            assert reply.json()["choices"][0]["message"]["content"] == "Hi there"
            cli.send_signal(signal.SIGINT)
            assert cli.wait(timeout=30) == 0
        finally:
            cli.kill()
