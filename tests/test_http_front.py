"""The signed OpenAI-compatible HTTP front, asked the way SN1's validators did: the openai SDK
with a request hook that signs (Epistula v2 or btauth/1), raw httpx for refusals. Its app is driven
in-process; what only sockets show (a hang-up, many streams at once, serving without the axon)
goes over 127.0.0.1 to a started miner."""

import asyncio
import json
import math
import time

import bittensor as bt
import httpx
import pytest

from openai_miner.fronts.auth import btauth_headers, epistula_headers
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.localnet import free_port
from openai_miner.testing.upstream import Fault, LoopbackUpstream, logprobs_of
from tests.helpers import Http, eventually, is_local, local_flags

WORDS = [f"w{i:02d} " for i in range(30)]
TEXT = "".join(WORDS)
MESSAGES = [{"role": "user", "content": "hello"}]


async def stream_text(http: Http, wallet: bt.Wallet, **kwargs) -> tuple[list[str], list]:
    """Every non-empty content delta of a streamed answer, and every chunk."""
    async with http.openai(wallet, scheme=kwargs.pop("scheme", "epistula")) as openai_:
        stream = await openai_.chat.completions.create(model="any", messages=MESSAGES, stream=True, **kwargs)
        chunks = [chunk async for chunk in stream]
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content], chunks


@pytest.mark.parametrize("scheme", ["epistula", "btauth"])
async def test_streams_the_exact_text_in_batches(serve_http, validator, scheme) -> None:
    source = FakeSource(WORDS)
    http = serve_http("--neuron.streaming_batch_size", "4", source=source)
    texts, chunks = await stream_text(http, validator, scheme=scheme)
    assert "".join(texts) == TEXT
    assert len(texts) == math.ceil(len(WORDS) / 4) and all(t.count(" ") == 4 for t in texts[:-1])
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[0].choices[0].delta.role == "assistant"
    assert source.seen[0][-1].content == "hello"


async def test_not_streamed_is_one_completion(serve_http, validator) -> None:
    http = serve_http(source=FakeSource(WORDS))
    async with http.openai(validator) as openai_:
        completion = await openai_.chat.completions.create(model="any", messages=MESSAGES)
    assert completion.choices[0].message.content == TEXT and completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == len(WORDS)


async def test_logprobs_come_one_token_a_chunk_with_the_asked_alternatives(serve_http, validator) -> None:
    http = serve_http("--neuron.streaming_batch_size", "8", source=FakeSource(WORDS[:5]))
    texts, chunks = await stream_text(http, validator, logprobs=True, top_logprobs=3)
    assert texts == WORDS[:5]
    content = [c.choices[0].logprobs.content for c in chunks if c.choices[0].delta.content]
    assert all(len(entries) == 1 and len(entries[0].top_logprobs) == 3 for entries in content)
    assert [entries[0].token for entries in content] == WORDS[:5]
    assert content[0][0].top_logprobs[0].token == WORDS[0] and content[0][0].logprob == -0.5


async def test_logprobs_and_sampling_pass_through_to_the_upstream(serve_http, validator) -> None:
    with LoopbackUpstream(tokens=WORDS[:4]) as up:
        http = serve_http("--openai.base_url", up.base_url, "--fallback.off")
        texts, chunks = await stream_text(
            http, validator, logprobs=True, top_logprobs=2, temperature=0.3, top_p=0.9, max_tokens=4,
            seed=7, stop=["zz"], extra_body={"sampling_parameters": {"top_k": 5}, "task": "InferenceTask"},
        )
    assert texts == WORDS[:4]
    entries = [c.choices[0].logprobs.content[0].model_dump(exclude_none=True) for c in chunks if c.choices[0].delta.content]
    assert entries == [logprobs_of(word, 2) for word in WORDS[:4]]
    sent = up.requests[0].body
    most = sent.get("max_completion_tokens", sent.get("max_tokens"))  # LangChain may use OpenAI's newer name
    assert (sent["temperature"], sent["top_p"], most, sent["seed"], sent["stop"]) == (0.3, 0.9, 4, 7, ["zz"])
    assert sent["top_k"] == 5 and sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert [m["role"] for m in sent["messages"]] == ["user"]  # InferenceTask: no system prompt added


async def test_other_tasks_get_their_system_prompt(serve_http, validator) -> None:
    source = FakeSource(WORDS[:2])
    http = serve_http(source=source)
    await stream_text(http, validator, extra_body={"task": "MSRv2Task"})
    assert source.seen[0][0].role == "system"


async def test_thirty_two_concurrent_streams_each_get_their_whole_answer(serve_http_port, validator) -> None:
    http = serve_http_port("--neuron.streaming_batch_size", "5", source=FakeSource(WORDS, interval=0.005))
    results = await asyncio.gather(*(stream_text(http, validator) for _ in range(32)))
    assert all("".join(texts) == TEXT for texts, _ in results)


async def test_the_deadline_flushes_and_ends_the_stream_cleanly(serve_http, validator) -> None:
    http = serve_http("--neuron.streaming_batch_size", "100", source=FakeSource(WORDS * 10, interval=0.01))
    started = time.monotonic()
    async with http.openai(validator) as openai_:
        stream = await openai_.chat.completions.create(
            model="any", messages=MESSAGES, stream=True, extra_headers={"X-Client-Timeout": "1.5"}
        )
        chunks = [chunk async for chunk in stream]
    took = time.monotonic() - started
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert 0 < len(text) < len(TEXT * 10) and (WORDS * 10)[0] == text[:4]
    assert chunks[-1].choices[0].finish_reason == "length" and took < 1.5


async def test_an_upstream_500_is_answered_by_the_local_model(serve_http, validator, tiny_model) -> None:
    with LoopbackUpstream(tokens=WORDS, fault=Fault(status=500)) as up:
        http = serve_http("--openai.base_url", up.base_url, "--openai.retry_backoff", "0.02", *local_flags(tiny_model))
        texts, _ = await stream_text(http, validator)
    assert is_local("".join(texts)) and len(up.requests) == 3  # tried, retried twice, then the local model


async def test_a_hang_up_cancels_the_upstream_request(serve_http_port, validator) -> None:
    with LoopbackUpstream(tokens=WORDS, interval=0.2) as up:
        http = serve_http_port("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "1")
        async with http.openai(validator) as openai_:
            stream = await openai_.chat.completions.create(model="any", messages=MESSAGES, stream=True)
            async for chunk in stream:
                if chunk.choices[0].delta.content:
                    break
            await stream.close()
        await eventually(lambda: up.requests and up.requests[0].disconnected, within=5)
    assert len(up.requests[0].token_times) < len(WORDS)


async def test_the_key_is_never_logged(serve_http, validator, caplog, monkeypatch) -> None:
    secret = "sk-secret-never-logged-123"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    bt.logging.set_debug(True)
    try:
        with LoopbackUpstream(tokens=WORDS[:3]) as up, caplog.at_level("DEBUG"):
            http = serve_http("--openai.base_url", up.base_url, "--fallback.off")
            texts, _ = await stream_text(http, validator)
            async with http.raw() as raw:
                health = (await raw.get("/health")).text
                await raw.post(CHAT, content=BODY)  # a refusal is logged too
    finally:
        bt.logging.set_debug(False)
    assert "".join(texts) == "".join(WORDS[:3]) and up.requests[0].headers["authorization"] == f"Bearer {secret}"
    assert "refused 401" in caplog.text and secret not in caplog.text and secret not in health


# -- refusals: each before any model work, with a JSON reason ----------------------------------


def signed(http: Http, wallet: bt.Wallet, body: bytes, **kwargs) -> dict[str, str]:
    return epistula_headers(wallet.hotkey, body, kwargs.pop("signed_for", http.miner.wallet.hotkey.ss58_address), **kwargs)


async def post(http: Http, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with http.raw() as raw:
        return await raw.post(CHAT, content=body, headers={"Content-Type": "application/json", **headers})


CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "any", "messages": MESSAGES, "stream": True}).encode()


@pytest.fixture
def refusing(serve_http, validator):
    source = FakeSource(WORDS)
    http = serve_http("--blacklist.max_requests_per_minute", "2", "--neuron.max_body_bytes", "4096", source=source)
    yield http
    assert source.seen == []  # no refused request reached the model


async def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]


async def test_unsigned_is_401(refusing) -> None:
    await refused(await post(refusing, BODY, {}), 401, "unsigned")


async def test_a_bad_signature_is_401(refusing, validator) -> None:
    headers = signed(refusing, validator, b"another body")
    await refused(await post(refusing, BODY, headers), 401, "signature")


async def test_stale_and_future_timestamps_are_401(refusing, validator) -> None:
    await refused(await post(refusing, BODY, signed(refusing, validator, BODY, now=time.time() - 60)), 401, "stale")
    await refused(await post(refusing, BODY, signed(refusing, validator, BODY, now=time.time() + 60)), 401, "future")


async def test_a_replay_is_401(serve_http, validator) -> None:
    http = serve_http(source=FakeSource(WORDS[:2]))
    headers = signed(http, validator, BODY)
    assert (await post(http, BODY, headers)).status_code == 200
    await refused(await post(http, BODY, headers), 401, "replay")


async def test_signed_for_another_hotkey_is_400(refusing, validator, wallets) -> None:
    other = wallets("other").hotkey.ss58_address
    await refused(await post(refusing, BODY, signed(refusing, validator, BODY, signed_for=other)), 400, "another hotkey")


async def test_an_unregistered_hotkey_is_403(refusing, wallets) -> None:
    stranger = wallets("stranger")
    await refused(await post(refusing, BODY, signed(refusing, stranger, BODY)), 403, "not registered")


async def test_too_large_is_413(refusing, validator) -> None:
    big = json.dumps({"model": "any", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    await refused(await post(refusing, big, signed(refusing, validator, big)), 413, "over 4096 bytes")


async def test_rate_limited_is_429(serve_http, validator) -> None:
    http = serve_http("--blacklist.max_requests_per_minute", "1", source=FakeSource(WORDS[:2]))
    assert (await post(http, BODY, signed(http, validator, BODY))).status_code == 200
    await refused(await post(http, BODY, signed(http, validator, BODY)), 429, "requests in a minute")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (json.dumps({"messages": "hi"}).encode(), "messages must be a list"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "unknown role"),
        (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), "temperature must be a number"),
    ],
)
async def test_a_malformed_body_is_400(refusing, validator, body, reason) -> None:
    await refused(await post(refusing, body, signed(refusing, validator, body)), 400, reason)


async def test_btauth_for_another_receiver_is_400_and_its_replay_401(serve_http, validator, wallets) -> None:
    http = serve_http(source=FakeSource(WORDS[:2]))
    other = wallets("other").hotkey.ss58_address
    path = "/v1/chat/completions"
    await refused(await post(http, BODY, btauth_headers(validator.hotkey, "POST", path, BODY, other)), 400, "another hotkey")
    headers = btauth_headers(validator.hotkey, "POST", path, BODY, http.miner.wallet.hotkey.ss58_address)
    assert (await post(http, BODY, headers)).status_code == 200
    await refused(await post(http, BODY, headers), 401, "replay")


# -- availability, health, serving alone ----------------------------------------------------------


async def test_availability_says_which_tasks_and_models(serve_http) -> None:
    with LoopbackUpstream(tokens=WORDS) as up:
        http = serve_http("--openai.base_url", up.base_url, "--openai.model_name", "served-model", "--fallback.off")
        asked = {
            "task_availabilities": {"InferenceTask": True, "WebRetrievalTask": True, "MSRv2Task": True},
            "llm_model_availabilities": {"served-model": False, "other/model": False},
        }
        async with http.raw() as raw:
            answer = (await raw.post("/availability", json=asked)).json()
            health = (await raw.get("/health")).json()
    assert answer == {
        "task_availabilities": {"InferenceTask": True, "WebRetrievalTask": False, "MSRv2Task": True},
        "llm_model_availabilities": {"served-model": True, "other/model": False},
    }
    assert health["status"] == "ok" and "served-model" in health["backend"]


async def test_axon_off_serves_http_alone(serve_http_port, validator) -> None:
    http = serve_http_port("--axon.off", source=FakeSource(WORDS))
    texts, _ = await stream_text(http, validator)
    assert "".join(texts) == TEXT
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", http.miner.axon.port)
