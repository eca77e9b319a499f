"""The fast path against the SDK's: what reaches the drain's queue is the same, item for item.

:func:`~openai_miner.sources.openai.chat_openai` streams through
:class:`~openai_miner.sources.openai.RawChunks` (each event as the dict the SDK parsed); the same
model with the SDK's own ``chat.completions`` builds a ``ChatCompletionChunk`` per event, as
``ChatOpenAI`` does. Every cassette and every way the loopback upstream answers or fails goes
through both; the items, the finish and the error must agree.
"""

import asyncio
import json
import time
from pathlib import Path

import pytest
import vcr
import yaml
from langchain_openai import ChatOpenAI

from openai_miner.messages import Message
from openai_miner.sources.base import DEFAULT_SAMPLING, Finish, Item, Sampling, UpstreamError
from openai_miner.sources.openai import OpenAISource, RawChunks, StreamedChatOpenAI, chat_openai
from openai_miner.testing.upstream import Fault, LoopbackUpstream, ToolCall
from tests.cassettes import CASSETTES, json_body

TOKENS = [f"w{i} " for i in range(25)]
MESSAGES = [Message("system", "be brief"), Message("user", "hello")]
TOOLS = ({"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}},)
CALLS = [ToolCall("weather", ['{"ci', 'ty": "Paris"}'], id="call_a"), ToolCall("time", ["{}"], id="call_b")]


def both(base_url: str, **settings) -> dict[str, ChatOpenAI]:
    """The fast model and the same model reading its streams through the SDK's objects."""
    settings = {"model": "loopback", "api_key": "sk-test", "max_tokens": 64, **settings}
    sdk = chat_openai(base_url=base_url, **settings)
    sdk.async_client = sdk.root_async_client.chat.completions
    return {"fast": chat_openai(base_url=base_url, **settings), "sdk": sdk}


async def answer(
    model: ChatOpenAI, messages: list[Message] = MESSAGES, sampling: Sampling = DEFAULT_SAMPLING
) -> tuple[list[Item], str | None]:
    """Everything ``produce`` put on the queue, and the error it raised (class and message)."""
    queue: asyncio.Queue[Item] = asyncio.Queue()
    error = None
    try:
        await OpenAISource(model, max_retries=0).produce(messages, queue, time.monotonic() + 10, sampling)
    except UpstreamError as raised:
        error = f"{type(raised).__name__}: {raised}"
    return [queue.get_nowait() for _ in range(queue.qsize())], error


async def same(models: dict[str, ChatOpenAI], **kwargs) -> tuple[list[Item], str | None]:
    fast, sdk = await answer(models["fast"], **kwargs), await answer(models["sdk"], **kwargs)
    assert fast == sdk
    return fast


def error_event(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"


MODES = {
    "text": ({}, Sampling()),
    "logprobs": ({}, Sampling(top_logprobs=2)),
    "logprobs, none asked": ({}, Sampling(top_logprobs=0)),
    "tool calls after text": ({"tool_calls": CALLS}, Sampling(tools=TOOLS)),
    "tool calls alone": ({"tokens": [], "tool_calls": CALLS}, Sampling(tools=TOOLS, tool_choice="required")),
    "no answer": ({"tokens": []}, Sampling()),
    "HTTP 500": ({"fault": Fault(status=500)}, Sampling()),
    "HTTP 429, Retry-After": ({"fault": Fault(status=429, retry_after=1)}, Sampling()),
    "HTTP 400": ({"fault": Fault(status=400)}, Sampling()),
    "HTTP 401": ({"fault": Fault(status=401)}, Sampling()),
    "cut mid-way": ({"fault": Fault(drop_after=3)}, Sampling()),
    "not JSON": ({"fault": Fault(malformed_after=3)}, Sampling()),
    "JSON, not an object": ({"fault": Fault(malformed_after=3, malformed=b"data: [1, 2]\n\n")}, Sampling()),
    "error event": ({"fault": Fault(malformed_after=3, malformed=error_event("overloaded"))}, Sampling()),
    "SSE comment": ({"fault": Fault(malformed_after=2, malformed=b": keep-alive\n\n")}, Sampling()),
}


@pytest.mark.parametrize("mode", MODES)
async def test_the_loopback_upstream_reaches_the_queue_alike(mode: str) -> None:
    upstream, sampling = MODES[mode]
    with LoopbackUpstream(**{"tokens": TOKENS, **upstream}) as up:
        items, error = await same(both(up.base_url), sampling=sampling)
    if mode.startswith(("text", "logprobs", "tool calls", "SSE")):  # complete: last the finish, with usage
        assert error is None and isinstance(items[-1], Finish) and items[-1].usage is not None
    else:
        assert error is not None


@pytest.mark.parametrize("cassette", sorted(CASSETTES.glob("*.yaml")), ids=lambda path: path.stem)
async def test_every_cassette_reaches_the_queue_alike(cassette: Path) -> None:
    """Each recorded request, sent again by both paths (the JSON body must match the recording)."""
    request = yaml.safe_load(cassette.read_text("utf-8"))["interactions"][0]["request"]
    body = json.loads(request["body"])
    settings = {"model": body["model"], "max_tokens": body.get("max_completion_tokens")}
    if "temperature" in body:
        settings["temperature"] = body["temperature"]
    messages = [Message(m["role"], m["content"]) for m in body["messages"]]
    recorder = vcr.VCR(record_mode="none", match_on=["method", "path", "json_body"])
    recorder.register_matcher("json_body", json_body)
    with recorder.use_cassette(str(cassette), allow_playback_repeats=True):
        items, error = await same(both(request["uri"].removesuffix("/chat/completions"), **settings), messages=messages)
    assert items or error


async def test_a_stream_builds_no_sdk_object_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails loudly if ``langchain_openai`` stops streaming through ``async_client.create`` or
    stops taking dict chunks (``setup.cfg`` pins the range this was tested on): the fast path
    would silently be the SDK's again, or break."""
    from openai.types.chat import ChatCompletionChunk

    def built(*args, **kwargs):
        raise AssertionError("the SDK built a ChatCompletionChunk")

    monkeypatch.setattr(ChatCompletionChunk, "construct", classmethod(built))
    streams: list[bool] = []
    create = RawChunks.create

    async def counted(self, **payload):
        streams.append(bool(payload.get("stream")))
        return await create(self, **payload)

    monkeypatch.setattr(RawChunks, "create", counted)
    with LoopbackUpstream(tokens=TOKENS) as up:
        models = both(up.base_url)
        assert isinstance(models["fast"], StreamedChatOpenAI) and isinstance(models["fast"].async_client, RawChunks)
        items, error = await answer(models["fast"], sampling=Sampling(top_logprobs=1))
        assert error is None and len(items) == len(TOKENS) + 1 and streams == [True]
        with pytest.raises(AssertionError, match="ChatCompletionChunk"):  # the patch reaches the SDK's own path
            await answer(models["sdk"])


async def test_an_answer_not_streamed_is_the_sdks() -> None:
    with LoopbackUpstream(tokens=TOKENS) as up:
        model = chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=64)
        model.streaming = False
        message = await model.ainvoke("hello")
    assert message.content == "".join(TOKENS) and message.usage_metadata["output_tokens"] == len(TOKENS)
