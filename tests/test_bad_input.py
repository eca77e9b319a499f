"""Bad input through the real axon: a clear refusal or a sane answer, never a crash or a hang.

Each refusal must reach the validator as a status and a readable reason (no stack trace), cost
no model work, and leave the miner serving. Bodies no ``bt.Dendrite`` would send are signed by
one and then replaced on the way, with raw aiohttp.
"""

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import bittensor as bt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_miner.messages import InvalidPrompt, to_chat_messages
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.testing.validator import Answer, ask
from openai_miner.testing.fake_source import FakeSource
from tests.helpers import is_local

TOKENS = ["fine", " thanks"]
ANSWER = "".join(TOKENS)
TRACEBACK = re.compile(r"Traceback|File \"|line \d+, in ")


def refused(answer: Answer, status: int, reason: str) -> bool:
    message = answer.synapse.dendrite.status_message or ""
    return (
        answer.status == status and reason in message and answer.text == ""
        and not TRACEBACK.search(message) and len(message) < 500
    )


def spy_refusals(miner, monkeypatch) -> list[tuple[str | None, str]]:
    """Every (address, reason) the miner counts in its refusal summary (``Access.refused``)."""
    seen: list[tuple[str | None, str]] = []
    count = miner.access.refused

    def recording(address: str | None, reason: str) -> None:
        seen.append((address, reason))
        count(address, reason)

    monkeypatch.setattr(miner.access, "refused", recording)
    return seen


@pytest.mark.parametrize(
    ("roles", "messages", "reason"),
    [
        (["user", "assistant"], ["only one"], "2 roles for 1 messages"),
        (["user"], ["one", "two"], "1 roles for 2 messages"),
        ([], [], "no messages"),
        (["wizard"], ["hi"], "unknown role 'wizard'"),
        (["x" * 100_000], ["hi"], "unknown role 'xxxx"),  # echoed whole, it overflowed the client's header limit
        (["\u65e5\u672c"], ["hi"], "unknown role '\\u65e5\\u672c'"),  # headers are Latin-1
        (["user"], [" \n\t "], "message 0 (user) is empty"),
        (["system", "assistant"], ["rules", "hello"], "no user message"),
        (["user"], ["x" * 1_000_000], "prompt of 1000000 characters is over this miner's limit"),
    ],
    ids=["more-roles", "more-messages", "empty-lists", "unknown-role", "100KB-role", "non-latin1-role",
         "blank-message", "no-user-message", "1MB-message"],
)
async def test_malformed_conversation_is_refused_with_its_reason(
    serve_miner, validator, monkeypatch, caplog, roles: list[str], messages: list[str], reason: str
) -> None:
    """The reason goes to the validator and to the periodic refusal summary, never to a log line
    of its own: bittensor logged an ERROR line for each, the miner an INFO line."""
    source = FakeSource(TOKENS)
    miner = serve_miner(source=source)
    summarised = spy_refusals(miner, monkeypatch)
    with caplog.at_level("INFO", logger="bittensor"):
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, roles, messages, timeout=5)
            following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=5)
    assert refused(answer, 400, reason), answer.synapse.dendrite.status_message
    assert len(summarised) == 1 and reason in summarised[0][1]
    lines = [r.getMessage() for r in caplog.records if r.levelname in ("INFO", "ERROR")]
    assert len(lines) == 1 and " via fake (complete)" in lines[0]  # the answered request's line alone
    assert answer.ended - answer.started < 2.0
    assert len(source.seen) == 1  # only the good request reached the model
    assert following.status == 200 and following.text == ANSWER


async def test_odd_but_valid_input_is_answered(serve_miner, validator) -> None:
    source = FakeSource(TOKENS)
    miner = serve_miner("--neuron.max_prompt_chars", "2000000", source=source)
    big = "word " * 200_000  # 1 MB, allowed by this miner's limit
    async with bt.Dendrite(wallet=validator) as dendrite:
        answers = [
            await ask(dendrite, miner.axon, [" User "], ["hi"]),
            await ask(dendrite, miner.axon, ["user"], ["nul \x00 and bell \x07 and \u202e bidi"]),
            await ask(dendrite, miner.axon, ["user"], [big]),
            await ask(dendrite, miner.axon, ["user", "assistant"] * 500 + ["user"], ["q", "a"] * 500 + ["last"]),
        ]
        newer = StreamPromptingSynapse(
            roles=["user"], messages=["hi"], task_name="qa", target_model="gpt-x", seed=42
        )
        responses = await dendrite.forward(miner.axon.info(), newer, timeout=5, deserialize=False, streaming=True)
        chunks = [item async for item in responses]
    assert all(a.status == 200 and a.text == ANSWER for a in answers)
    assert source.seen[2][-1].content == big and len(source.seen[3]) == 1 + 1001  # system prompt + all
    assert "".join(chunks[:-1]) == ANSWER and chunks[-1].dendrite.status_code == 200


# -- bodies no bt.Dendrite sends -------------------------------------------------------------------


def tamper(body: dict[str, Any], **changes: Any) -> bytes:
    """The signed body with fields replaced (a value of ``...`` deletes the field)."""
    body = {**body, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


# name -> (how the body changes, the statuses that count as a clear refusal)
RAW: dict[str, tuple[Any, set[int]]] = {
    "non-utf8": (lambda b: json.dumps(b).encode().replace(b'"hello"', b'"h\xff\xfeo"'), {400}),
    "not-json": (lambda b: b"{not json", {400, 422}),
    "empty-body": (lambda b: b"", {400, 422}),
    "json-list": (lambda b: b"[1, 2]", {400, 422}),
    "roles-a-string": (lambda b: tamper(b, roles="user"), {400, 422}),
    "roles-of-ints": (lambda b: tamper(b, roles=[1]), {400, 422}),
    "roles-of-null": (lambda b: tamper(b, roles=[None]), {400, 422}),
    "messages-a-string": (lambda b: tamper(b, messages="hello"), {400, 422}),
    "missing-roles": (lambda b: tamper(b, roles=...), {400, 422}),
    "missing-messages": (lambda b: tamper(b, messages=...), {400, 422}),
    "seed-not-an-int": (lambda b: tamper(b, seed="x"), {400, 422}),
    "other-messages": (lambda b: tamper(b, messages=["not what was signed"]), {400, 401}),
    "lone-surrogate": (lambda b: json.dumps(b).encode().replace(b'"hello"', b'"\\ud800"'), {400, 422}),
    "timeout-of-400-digits": (lambda b: tamper(b, timeout=10**400), {400}),  # pydantic's float() overflowed: 500
    "timeout-infinite": (lambda b: tamper(b, timeout=float("inf")), {400}),
    "timeout-nan": (lambda b: tamper(b, timeout=float("nan")), {400}),
    "nested-100k-deep": (lambda b: b"[" * 100_000 + b"]" * 100_000, {400}),
}
# bittensor's own axon answers these with an opaque 500 "Internal Server Error #<id>"; the miner's
# Axon (neuron.py) answers 400 with the reason.
REFUSED_400 = {
    "empty-body", "json-list", "roles-a-string", "roles-of-ints", "roles-of-null", "messages-a-string",
    "missing-roles", "missing-messages", "seed-not-an-int", "other-messages", "lone-surrogate",
    "timeout-of-400-digits",
}


async def test_raw_bad_bodies_are_refused_without_a_trace(serve_miner, validator) -> None:
    source = FakeSource(TOKENS)
    miner = serve_miner(source=source)
    dendrite = bt.Dendrite(wallet=validator)
    url = f"http://127.0.0.1:{miner.axon.port}/StreamPromptingSynapse"
    seen: dict[str, tuple[int, str]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for name, (change, _) in RAW.items():
            synapse = dendrite.preprocess_synapse_for_request(
                miner.axon.info(), StreamPromptingSynapse(roles=["user"], messages=["hello"]), 5
            )
            headers = {**synapse.to_headers(), "content-type": "application/json"}
            async with session.post(url, headers=headers, data=change(synapse.model_dump())) as response:
                seen[name] = (response.status, (await response.read()).decode("utf-8", "replace"))
        extra = dendrite.preprocess_synapse_for_request(
            miner.axon.info(), StreamPromptingSynapse(roles=["user"], messages=["hello"]), 5
        )
        data = tamper(extra.model_dump(), unknown_field={"nested": [1, 2]}, completion="injected")
        headers = {**extra.to_headers(), "content-type": "application/json"}
        async with session.post(url, headers=headers, data=data) as response:
            extra_fields = (response.status, await response.text())
    following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=5)
    await dendrite.aclose_session()
    print("\n" + "\n".join(f"{name}: {status} {body[:100]}" for name, (status, body) in seen.items()))
    for name, (status, body) in seen.items():
        expected = {400} if name in REFUSED_400 else RAW[name][1]
        assert status in expected, (name, status, body)
        assert not TRACEBACK.search(body) and len(body) < 1000, (name, body)
        if name in REFUSED_400:
            assert "invalid synapse body" in body, (name, body)
    assert extra_fields == (200, ANSWER)  # extra fields are ignored, not an error
    assert len(source.seen) == 2  # nothing malformed reached the model
    assert following.status == 200 and following.text == ANSWER


# -- a prompt over the model's context ------------------------------------------------------------
# Over the upstream's context it is an HTTP 400 from the upstream: see test_faults' "400-over-context"
# case (empty answer and a logged reason, not retried, local answer when there is a local model).


async def test_prompt_over_the_local_models_context_is_truncated_to_fit(
    serve_miner, validator, tiny_model, monkeypatch
) -> None:
    miner = serve_miner(
        "--fallback.model", tiny_model, "--fallback.device", "cpu", "--fallback.max_new_tokens", "12",
    )
    from openai_miner.sources.local import LocalSource

    lengths: list[int] = []
    prompt = LocalSource._prompt

    def recording(self: LocalSource, *args: Any, **kwargs: Any) -> Any:  # the prompt ids the model is given
        ids = prompt(self, *args, **kwargs)
        lengths.append(len(ids))
        return ids

    monkeypatch.setattr(LocalSource, "_prompt", recording)  # the miner's local source, whatever wraps it
    context = json.loads((Path(tiny_model) / "config.json").read_text())["max_position_embeddings"]
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["the " * (context + 1000)], timeout=10)
        following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=5)
    assert answer.status == 200 and is_local(answer.text)
    assert lengths[0] == context - 12  # its most recent tokens, room left for the answer
    assert following.status == 200 and is_local(following.text) and lengths[1] < 50


# -- any synapse contents --------------------------------------------------------------------------

ROLE = st.one_of(
    st.sampled_from(["user", "system", "assistant", "User", " assistant\n", "tool", ""]),
    st.text(max_size=12),
)
MESSAGE = st.one_of(st.sampled_from(["hi", "", " ", "\x00"]), st.text(max_size=60))


@pytest.fixture
def answering_miner(serve_miner, validator):
    """One miner for all the examples of a property test (fixtures are not reset between them)."""
    return serve_miner(source=FakeSource(TOKENS))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(roles=st.lists(ROLE, max_size=4), messages=st.lists(MESSAGE, max_size=4))
async def test_any_synapse_contents_get_an_answer_or_a_refusal(answering_miner, validator, roles, messages) -> None:
    """The oracle is the validation itself: 200 and the answer exactly when it accepts the input."""
    try:
        to_chat_messages(roles, messages)
        accepted = True
    except InvalidPrompt:
        accepted = False
    started = time.monotonic()
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, answering_miner.axon, roles, messages, timeout=5)
    assert time.monotonic() - started < 3.0
    if accepted:
        assert answer.status == 200 and answer.text == ANSWER
    else:
        assert refused(answer, 400, "invalid prompt: "), answer.synapse.dendrite.status_message


async def test_a_hundred_thousand_messages_are_refused_before_bittensor_parses_them(
    serve_miner, validator, monkeypatch, caplog
) -> None:
    """FastAPI and bittensor parsed such a body twice as JSON and twice into a synapse, and hashed
    and dumped it for the refusal's headers: 0.15 s of the event loop every validator shares, then
    an ERROR and an INFO line, for each. Now its strings are counted first, and the refusal goes
    to the summary."""
    from starlette.requests import Request

    parsed: list[str] = []
    as_json = Request.json

    async def counting(self: Request) -> Any:
        parsed.append(self.url.path)
        return await as_json(self)

    monkeypatch.setattr(Request, "json", counting)
    source = FakeSource(["fine"])
    miner = serve_miner(source=source)
    summarised = spy_refusals(miner, monkeypatch)
    many = ["x"] * 100_000
    with caplog.at_level("INFO", logger="bittensor"):
        async with bt.Dendrite(wallet=validator) as dendrite:
            flood, other = await asyncio.gather(
                ask(dendrite, miner.axon, ["user"] * len(many), many, timeout=30),
                ask(dendrite, miner.axon, ["user"], ["hello"], timeout=30),
            )
    assert refused(flood, 413, "over 1024 messages (--neuron.max_messages)"), flood.message
    assert other.status == 200 and other.text == "fine" and len(source.seen) == 1
    assert len(parsed) == 1  # the one that was answered
    assert summarised == [("127.0.0.1", flood.message)]
    lines = [r.getMessage() for r in caplog.records if r.levelname in ("INFO", "ERROR")]
    assert len(lines) == 1 and " via fake (complete)" in lines[0]  # the answered request's line alone


async def test_the_message_cap_refuses_early_only_what_the_core_would_refuse(serve_miner, validator) -> None:
    """At the limit answered; just over it refused by the core with the exact count; far over it
    (more strings than the messages, their roles and the synapse's fields could be) refused
    before anything parses the body."""
    miner = serve_miner("--neuron.max_messages", "3", source=FakeSource(TOKENS))
    async with bt.Dendrite(wallet=validator) as dendrite:
        at_limit, over, well_over, far_over = [
            await ask(dendrite, miner.axon, ["user"] * n, [f"m{i}" for i in range(n)], timeout=5) for n in (3, 4, 100, 300)
        ]
    assert at_limit.status == 200 and at_limit.text == ANSWER
    assert refused(over, 400, "4 messages is over this miner's limit of 3")
    assert refused(well_over, 400, "100 messages is over this miner's limit of 3")
    assert refused(far_over, 413, "over 3 messages (--neuron.max_messages)")


async def test_the_http_front_refuses_too_many_messages_too(serve_miner, validator) -> None:
    import json

    import httpx

    from openai_miner.fronts.auth import epistula_headers
    from openai_miner.testing.localnet import free_port

    source = FakeSource(["fine"])
    miner = serve_miner("--http.port", str(free_port()), "--neuron.max_messages", "3", source=source)
    body = json.dumps({"messages": [{"role": "user", "content": "x"}] * 4}).encode()
    headers = epistula_headers(validator.hotkey, body, miner.wallet.hotkey.ss58_address)
    async with httpx.AsyncClient() as client:
        response = await client.post(f"http://127.0.0.1:{miner.config.http.port}/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400 and "4 messages is over this miner's limit of 3" in response.json()["error"]["message"]
    assert source.seen == []
