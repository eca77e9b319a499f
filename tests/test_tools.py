"""Tool calls through the core: OpenAI's ``tools`` and ``tool_choice`` reach the upstream as sent, its
calls come back through the drain to every front that speaks them (arguments byte for byte), and
a malformed tool request is refused before any model work."""

import json
import time
from typing import Any

import bittensor as bt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openai_miner.fronts.http import parse_chat
from openai_miner.messages import InvalidPrompt, Message, to_chat_messages
from openai_miner.messages import ToolCall as CalledTool  # the loopback upstream has a ToolCall of its own
from openai_miner.sources.base import (
    DEFAULT_SAMPLING,
    Finish,
    Sampling,
    ToolCallDelta,
    Usage,
)
from openai_miner.sources.openai import OpenAISource, chat_openai, langchain_messages
from openai_miner.streaming import stream_answer, text_of, tool_calls_of
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.upstream import LoopbackUpstream, ToolCall
from openai_miner.testing.validator import ask, ask_http
from tests.helpers import Http
from tests.sn78 import CHALLENGE, miner  # noqa: F401  (the SN78 front's fixture)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
# Fragments as a model splits them: mid-key, mid-escape, mid-character of none, odd spacing kept.
FRAGMENTS = ['{"ci', 'ty":  "Par', 'is \\"Île', '-de-France\\"" ', ',"unit":"°C"}']
ARGUMENTS = "".join(FRAGMENTS)
CALL = ToolCall("weather", FRAGMENTS, id="call_abc")
MESSAGES = [{"role": "user", "content": "weather in paris?"}]


def upstream_miner(serve_http, up: LoopbackUpstream, *extra: str) -> Http:
    return serve_http("--openai.base_url", up.base_url, "--fallback.off", *extra)


# -- the HTTP front ----------------------------------------------------------------------------------


async def test_a_streamed_tool_call_arrives_byte_exact_with_finish_reason_tool_calls(serve_http_port, validator) -> None:
    with LoopbackUpstream(tokens=[], tool_calls=[CALL]) as up:
        served = upstream_miner(serve_http_port, up, "--neuron.streaming_batch_size", "2")
        async with served.signing(validator) as client:
            answer = await ask_http(
                client, served.miner.config.http.port, "weather in paris?", extra={"tools": TOOLS, "tool_choice": "auto"}
            )
        sent = up.requests[0].body
    assert answer.status == 200 and answer.error is None and answer.text == ""
    assert answer.tool_calls == [{"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": ARGUMENTS}}]
    assert answer.finish_reason == "tool_calls"
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"  # as the validator sent them


async def test_text_then_two_calls_stream_through_the_sdk(serve_http, validator) -> None:
    second = ToolCall("weather", ['{"city":', '"Rome"}'], id="call_def")
    with LoopbackUpstream(tokens=["Let ", "me ", "look."], tool_calls=[CALL, second]) as up:
        served = upstream_miner(serve_http, up, "--neuron.streaming_batch_size", "3")
        async with served.openai(validator) as openai_:
            stream = await openai_.chat.completions.create(model="any", messages=MESSAGES, tools=TOOLS, stream=True)
            chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for piece in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": piece.id, "name": piece.function.name, "arguments": ""})
            call["arguments"] += piece.function.arguments or ""
    assert text == "Let me look."
    assert calls == {
        0: {"id": "call_abc", "name": "weather", "arguments": ARGUMENTS},
        1: {"id": "call_def", "name": "weather", "arguments": '{"city":"Rome"}'},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_a_whole_answer_carries_message_tool_calls(serve_http, validator) -> None:
    with LoopbackUpstream(tokens=[], tool_calls=[CALL]) as up:
        served = upstream_miner(serve_http, up)
        async with served.openai(validator) as openai_:
            completion = await openai_.chat.completions.create(
                model="any", messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}}
            )
        sent = up.requests[0].body
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name, call.function.arguments) == ("call_abc", "function", "weather", ARGUMENTS)
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


async def test_a_tool_conversation_reaches_the_upstream_in_openais_shape(serve_http, validator) -> None:
    history = [
        {"role": "user", "content": "weather in paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"},
    ]
    with LoopbackUpstream(tokens=["Sunny, ", "18."]) as up:
        served = upstream_miner(serve_http, up)
        async with served.openai(validator) as openai_:
            completion = await openai_.chat.completions.create(model="any", messages=history, tools=TOOLS)
        sent = up.requests[0].body["messages"]
    assert completion.choices[0].message.content == "Sunny, 18." and completion.choices[0].finish_reason == "stop"
    assert [m["role"] for m in sent][-3:] == ["user", "assistant", "tool"]
    assistant, tool = sent[-2:]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in assistant["tool_calls"]] == [
        ("call_abc", "weather", {"city": "Paris"})
    ]
    assert tool == {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"}


BAD = [
    ({"tools": {"type": "function"}}, "tools must be a list"),
    ({"tools": ["weather"]}, "tools must be a list"),
    ({"tools": TOOLS * 129}, "at most 128"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": 1}, "tool_choice must be"),
    ({"tool_choice": "auto"}, "tool_choice needs tools"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "18"}]}, "needs a tool_call_id"),
    ({"messages": [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]}, "tool_calls"),
    ({"messages": [*MESSAGES, {"role": "assistant", "tool_calls": []}]}, "1 to 128 calls"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "only an assistant's"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
]


@pytest.mark.parametrize(("change", "reason"), BAD, ids=[reason for _, reason in BAD])
async def test_a_malformed_tool_request_is_a_400_before_any_model_work(serve_http, validator, change, reason) -> None:
    source = FakeSource(["never"])
    served = serve_http(source=source)
    body = json.dumps({"model": "any", "messages": MESSAGES, "stream": True, **change}).encode()
    async with served.signing(validator) as client:
        response = await client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]
    assert source.seen == []


# -- the SN78 front ----------------------------------------------------------------------------------


async def test_sn78_answers_with_the_calls_their_finish_reason_and_usage(miner) -> None:  # noqa: F811
    with LoopbackUpstream(tokens=[], tool_calls=[CALL]) as up:
        source = OpenAISource(chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=64))
        reply = await miner(source).validator().ask({**CHALLENGE, "tools": TOOLS, "tool_choice": "required"})
        sent = up.requests[0].body
    assert reply.ok, reply
    assert reply.tool_calls == [{"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": ARGUMENTS}}]
    assert reply.answer["finish_reason"] == "tool_calls" and reply.answer["response_text"] == ""
    assert reply.usage == {"prompt_tokens": 1, "completion_tokens": len(FRAGMENTS), "total_tokens": 1 + len(FRAGMENTS)}
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "required"


async def test_sn78_refuses_malformed_tools_before_the_model(miner) -> None:  # noqa: F811
    source = FakeSource(["never"])
    front = miner(source)
    validator = front.validator()
    await validator.handshake()
    token = validator.session.fernet.encrypt(json.dumps({**CHALLENGE, "tools": "weather"}).encode())
    response = await validator.post(token)
    assert response.status_code == 400 and "tools must be a list" in response.json()["detail"]
    assert source.seen == []


# -- the drain and the axon --------------------------------------------------------------------------


class Calling:
    """Says ``text``, calls a tool in ``pieces``, then finishes as the upstream would."""

    name = "calling"

    def __init__(self, text: list[str], pieces: list[ToolCallDelta]) -> None:
        self.text, self.pieces = text, pieces

    def describe(self) -> str:
        return self.name

    def models(self) -> frozenset[str]:
        return frozenset({self.name})

    async def produce(self, messages, queue, deadline, sampling: Sampling = DEFAULT_SAMPLING) -> None:
        for item in [*self.text, *self.pieces]:
            queue.put_nowait(item)
        queue.put_nowait(Finish("tool_calls", Usage(7, 5)))


PIECES = [ToolCallDelta(0, "call_abc", "weather", "")] + [ToolCallDelta(0, None, None, f) for f in FRAGMENTS]


async def test_the_drain_passes_calls_on_uncounted_and_keeps_the_finish_out_of_the_batches() -> None:
    batches: list[list] = []

    async def emit(batch) -> None:
        batches.append(list(batch))

    source = Calling(["a ", "b "], PIECES)
    result = await stream_answer(source, [Message("user", "hi")], emit, batch_size=3, deadline=time.monotonic() + 10)
    pieces = [item for batch in batches for item in batch]
    assert pieces == ["a ", "b ", *PIECES] and not any(isinstance(item, Finish) for item in pieces)
    assert result.tokens == 2 and result.finish_reason == "tool_calls" and result.usage == Usage(7, 5)
    assert text_of(pieces) == "a b " and tool_calls_of(pieces) == [ToolCallDelta(0, "call_abc", "weather", ARGUMENTS)]


async def test_the_axon_answers_the_text_only(serve_miner, validator) -> None:
    served = serve_miner(source=Calling(["plain ", "text"], PIECES))
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, served.axon, ["user"], ["hi"], timeout=10)
    assert answer.status == 200 and answer.text == "plain text"


# -- messages ----------------------------------------------------------------------------------------


def test_a_tool_conversation_maps_to_messages_and_on_to_langchains() -> None:
    call = {"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": "{not json"}}
    chat = to_chat_messages(
        ["user", "assistant", "tool"], ["hi", "", ""],
        extras=[{}, {"tool_calls": [call]}, {"tool_call_id": "call_abc"}],
    )
    assert chat[1:] == [
        Message("assistant", "", tool_calls=(CalledTool("call_abc", "weather", "{not json"),)),  # kept as the model wrote it
        Message("tool", "", tool_call_id="call_abc"),
    ]
    called, answered = langchain_messages(chat)[1:]
    assert called.invalid_tool_calls[0]["args"] == "{not json" and not called.tool_calls
    assert answered.tool_call_id == "call_abc" and answered.content == ""


@pytest.mark.parametrize(
    ("roles", "contents", "extras", "reason"),
    [
        (["user", "tool"], ["hi", "x"], [{}, {"tool_call_id": ""}], "needs a tool_call_id"),
        (["user", "tool"], ["hi", "x"], [{}, {"tool_call_id": "x" * 257}], "needs a tool_call_id"),
        (["user", "assistant"], ["hi", ""], [{}, {}], "is empty"),
        (["user"], ["hi"], [{}, {}], "2 extras for 1 messages"),
    ],
)
def test_a_malformed_tool_conversation_is_refused_with_its_reason(roles, contents, extras, reason) -> None:
    with pytest.raises(InvalidPrompt, match=reason):
        to_chat_messages(roles, contents, extras=extras)


def test_tool_calls_arguments_count_toward_the_prompt_limit() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x" * 100}}
    with pytest.raises(InvalidPrompt, match="arguments"):
        to_chat_messages(["user", "assistant"], ["hi", ""], extras=[{}, {"tool_calls": [call]}], max_chars=50)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
ARGUMENT_TEXTS = st.sampled_from(["{}", '{"a": 1}', "1", "[1]", "null", '"s"', "NaN", "{", "[" * 5000])
CALL_SHAPED = st.fixed_dictionaries(
    {"id": JSON | st.text(max_size=8), "type": JSON | st.just("function")},
    optional={"function": st.fixed_dictionaries({}, optional={"name": JSON | st.text(max_size=8), "arguments": JSON | st.text(max_size=12) | ARGUMENT_TEXTS})},
)


@settings(max_examples=300, deadline=None)
@given(
    tools=st.none() | JSON | st.lists(JSON, max_size=3), tool_choice=st.none() | JSON, stream_options=st.none() | JSON,
    tool_calls=JSON | st.lists(CALL_SHAPED, max_size=2), tool_call_id=JSON, role=st.sampled_from(["assistant", "tool", "user"]),
)
def test_any_tool_fields_are_taken_or_refused_with_a_reason(tools, tool_choice, stream_options, tool_calls, tool_call_id, role) -> None:
    """Never anything but :class:`InvalidPrompt` (a 400) from the parsing and the mapping: no 5xx."""
    turn = {"role": role, "content": None, "tool_calls": tool_calls, "tool_call_id": tool_call_id}
    body = {"messages": [*MESSAGES, turn], "tools": tools, "tool_choice": tool_choice, "stream_options": stream_options}
    try:
        asked = parse_chat(body)
        langchain_messages(to_chat_messages(asked.roles, asked.contents, extras=asked.extras))
    except InvalidPrompt:
        pass


@pytest.mark.parametrize("arguments", ["1", "[1]", "null", '"s"', "NaN", "{", "[" * 5000, '{"city": "Paris"}'])
def test_a_past_call_with_any_arguments_is_answerable(arguments: str) -> None:
    """Arguments that are no JSON object (the model wrote them) made LangChain's message fail: a 500."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    [_, message] = langchain_messages(to_chat_messages(["user", "assistant"], ["hi", ""], extras=[{}, {"tool_calls": [call]}]))
    assert len(message.tool_calls) + len(message.invalid_tool_calls) == 1
