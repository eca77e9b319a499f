"""SN78's front driven in-process (httpx's ASGI transport) by a client that behaves as Loosh's validator:
the handshake, the encrypted challenge and its answer, and every refusal, each before any model work."""

import argparse
import asyncio
import json
import logging
import time
from typing import Any, Callable

import bittensor as bt
import httpx
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from openai_miner.access import Access, AccessPolicy, RateLimiter, RecentPrompts
from openai_miner.chain import Registry
from openai_miner.core import Core
from openai_miner.fronts.loosh import AHEAD, DEFAULT_TIMEOUT, KEY_TTL, OAEP, WINDOW, LooshFront, add_args
from openai_miner.messages import Message
from openai_miner.sources.base import DEFAULT_SAMPLING, Sampling
from openai_miner.system_prompts import SystemPrompts
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.loosh import Session, key_exchange
from tests.sn78 import (  # noqa: F401  (miner: the front's fixture)
    CHALLENGE, MINER, OTHER, PUBLIC_PEM, RSA_KEY, STRANGER, TEXT, VALIDATOR, WORDS, Clock, CountingKey, Miner, miner,
)

class Stalling:
    """Says ``tokens``, then nothing until cancelled: an upstream stalled mid-answer."""

    name = "stalling"

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.started = asyncio.Event()
        self.cancelled = 0

    def describe(self) -> str:
        return self.name

    def models(self) -> frozenset[str]:
        return frozenset({self.name})

    async def produce(self, messages, queue, deadline, sampling: Sampling = DEFAULT_SAMPLING) -> None:
        for token in self.tokens:
            queue.put_nowait(token)
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def post_offer(miner: Miner, body: Any) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await miner.client.post("/fiber/key-exchange", content=raw, headers={"content-type": "application/json"})


# -- answers


async def test_a_prompt_is_answered_with_the_exact_text(miner) -> None:
    source = FakeSource(WORDS)
    validator = miner(source).validator()
    reply = await validator.ask(CHALLENGE)
    assert reply.ok, reply
    answer = reply.answer
    assert answer["response_text"] == TEXT and answer["finish_reason"] == "stop" and answer["tool_calls"] is None
    assert answer["usage"] == {"prompt_tokens": 0, "completion_tokens": len(WORDS), "total_tokens": len(WORDS)}
    assert answer["correlation_id"] == "c-1" and isinstance(answer["response_time_ms"], int)
    [messages] = source.seen
    assert messages == [Message("user", "hello")]  # no system prompt added
    assert source.sampling == [Sampling(temperature=0.7, top_p=0.95, max_tokens=12288)]


async def test_the_answer_is_a_token_under_the_same_key_with_the_fiber_headers(miner) -> None:
    validator = miner().validator()
    await validator.handshake()
    response = await validator.post(validator.session.fernet.encrypt(json.dumps(CHALLENGE).encode()))
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-fiber-symmetric-key-uuid"] == validator.session.key_id
    assert response.headers["x-fiber-miner-hotkey-ss58"] == MINER.ss58_address
    assert json.loads(validator.session.fernet.decrypt(response.content))["response_text"] == TEXT


async def test_messages_with_text_parts_reach_the_model_as_sent(miner) -> None:
    source = FakeSource(WORDS)
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    reply = await miner(source).validator().ask({**CHALLENGE, "prompt": "ignored", "messages": messages})
    assert reply.ok
    assert source.seen[0] == [
        Message("system", "Be terse."), Message("user", "two parts"), Message("assistant", "ok"), Message("user", "again"),
    ]


async def test_availability_follows_what_the_wiring_says(miner) -> None:
    able = [True]
    m = miner(available=lambda: able[0])
    validator = m.validator()
    assert await validator.available() is True
    able[0] = False
    assert await validator.available() is False
    assert (await m.client.get("/availability")).json() == {"available": False}


async def test_challenges_while_unavailable_get_a_503_without_decryption(miner) -> None:
    able = [True]
    source = FakeSource(WORDS)
    validator = miner(source, available=lambda: able[0]).validator()
    await validator.handshake()
    able[0] = False
    reply = await validator.ask(CHALLENGE)
    assert reply.status == 503 and source.seen == []


async def test_the_public_key_is_rsa_2048_pem(miner) -> None:
    response = await miner().client.get("/fiber/public-key")
    key = serialization.load_pem_public_key(response.json()["public_key"].encode())
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


async def test_a_key_made_at_start_is_rsa_2048() -> None:
    source = FakeSource(WORDS)
    access = Access(AccessPolicy(), Registry(), RateLimiter(0), RecentPrompts(0))
    front = LooshFront(Core(source, access, SystemPrompts({})), lambda: True, MINER.ss58_address)
    key = serialization.load_pem_public_key(front.public_key.encode())
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


async def test_the_deadline_sends_what_was_said_with_finish_reason_length(miner) -> None:
    source = Stalling(WORDS[:3])
    reply = await miner(source, timeout=0.2).validator().ask(CHALLENGE)
    assert reply.ok, reply
    assert reply.answer["response_text"] == "".join(WORDS[:3]) and reply.answer["finish_reason"] == "length"
    assert reply.answer["usage"]["completion_tokens"] == 3 and source.cancelled == 1


async def test_a_model_failing_mid_answer_sends_what_it_said_and_one_failing_at_once_a_502(miner) -> None:
    reply = await miner(FakeSource(WORDS, fail_after=4)).validator().ask(CHALLENGE)
    assert reply.answer["response_text"] == "".join(WORDS[:4]) and reply.answer["finish_reason"] == "length"
    reply = await miner(FakeSource(WORDS, fail_after=0)).validator().ask(CHALLENGE)
    assert reply.status == 502 and reply.answer is None


async def test_a_validator_hanging_up_cancels_the_answer(miner) -> None:
    """Straight ASGI: httpx's transport cannot hang up while the app runs."""
    source = Stalling(WORDS[:2])
    m = miner(source)
    validator = m.validator()
    await validator.handshake()
    token = validator.session.fernet.encrypt(json.dumps(CHALLENGE).encode())
    gone, sent = asyncio.Event(), []
    messages = [{"type": "http.request", "body": token, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [
        (b"x-fiber-validator-hotkey-ss58", VALIDATOR.ss58_address.encode()),
        (b"x-fiber-symmetric-key-uuid", validator.session.key_id.encode()),
        (b"content-length", str(len(token)).encode()),
    ]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/fiber/challenge", "raw_path": b"/fiber/challenge", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("miner", 80),
    }
    serving = asyncio.ensure_future(m.front.app(scope, receive, send))
    await source.started.wait()
    gone.set()
    await serving
    assert source.cancelled == 1 and m.front.core.stats.by_outcome()["complete"] == 0
    assert sent[0]["status"] == 499  # nobody reads it


# -- the handshake's refusals


async def test_a_stranger_is_refused_before_any_signature_or_rsa_work(miner) -> None:
    m = miner()
    body, _ = key_exchange(STRANGER, m.front.public_key)
    response = await post_offer(m, {**body, "signature": "0x00"})  # a bad signature: never looked at
    assert response.status_code == 403 and "not registered" in response.json()["detail"]
    assert m.key.decrypts == 0


@pytest.mark.parametrize("offset", [-(WINDOW + 5), AHEAD + 3], ids=["stale", "future"])
async def test_a_timestamp_out_of_the_window_is_refused(miner, offset: float) -> None:
    m = miner()
    body, _ = key_exchange(VALIDATOR, m.front.public_key, timestamp=time.time() + offset)
    response = await post_offer(m, body)
    assert response.status_code == 401 and "timestamp" in response.json()["detail"] and m.key.decrypts == 0


async def test_a_timestamp_within_the_window_is_taken(miner) -> None:
    m = miner()
    for offset in (-(WINDOW - 5), AHEAD - 1):
        body, _ = key_exchange(VALIDATOR, m.front.public_key, timestamp=time.time() + offset)
        assert (await post_offer(m, body)).json() == {"success": True, "message": "symmetric key exchanged"}


async def test_a_replayed_nonce_is_refused(miner) -> None:
    m = miner()
    body, _ = key_exchange(VALIDATOR, m.front.public_key)
    assert (await post_offer(m, body)).status_code == 200
    again = await post_offer(m, body)
    assert again.status_code == 401 and "nonce" in again.json()["detail"] and m.key.decrypts == 1


def signed_by_another(body: dict) -> dict:
    forged, _ = key_exchange(OTHER, PUBLIC_PEM, timestamp=body["timestamp"], nonce=body["nonce"])
    return {**body, "signature": forged["signature"]}


BAD_SIGNATURES: dict[str, Callable[[dict], dict]] = {
    "another hotkey's": signed_by_another,
    "over another nonce": lambda body: {**body, "nonce": "another"},
    "over another timestamp": lambda body: {**body, "timestamp": body["timestamp"] + 0.25},
    "not hex": lambda body: {**body, "signature": "0xzz"},
    "no 0x": lambda body: {**body, "signature": body["signature"][2:]},
    "too short": lambda body: {**body, "signature": body["signature"][:-2]},
}


@pytest.mark.parametrize("forge", BAD_SIGNATURES.values(), ids=BAD_SIGNATURES.keys())
async def test_a_bad_signature_is_refused(miner, forge: Callable[[dict], dict]) -> None:
    m = miner()
    body, _ = key_exchange(VALIDATOR, m.front.public_key)
    response = await post_offer(m, forge(body))
    assert response.status_code == 401 and "signature" in response.json()["detail"] and m.key.decrypts == 0


def encrypted(key: bytes, under: rsa.RSAPublicKey | None = None) -> str:
    return (under or RSA_KEY.public_key()).encrypt(key, OAEP).hex()


MALFORMED: dict[str, Callable[[dict], Any]] = {
    "not JSON": lambda body: b"{not json",
    "a list": lambda body: [body],
    "no nonce": lambda body: {k: v for k, v in body.items() if k != "nonce"},
    "timestamp a string": lambda body: {**body, "timestamp": str(body["timestamp"])},
    "timestamp true": lambda body: {**body, "timestamp": True},
    "timestamp NaN": lambda body: json.dumps(body).replace(f'"timestamp": {body["timestamp"]}', '"timestamp": NaN').encode(),
    "hotkey a number": lambda body: {**body, "validator_hotkey_ss58": 5},
    "uuid with a newline": lambda body: {**body, "symmetric_key_uuid": "a\nb"},
    "key not hex": lambda body: {**body, "encrypted_symmetric_key": "zz"},
    "key not a Fernet key": lambda body: {**body, "encrypted_symmetric_key": encrypted(b"short")},
    "key under another RSA key": lambda body: {
        **body, "encrypted_symmetric_key": encrypted(Fernet.generate_key(), rsa.generate_private_key(65537, 2048).public_key()),
    },
}


@pytest.mark.parametrize("mangle", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_key_exchange_is_a_400(miner, mangle: Callable[[dict], Any]) -> None:
    m = miner()
    body, _ = key_exchange(VALIDATOR, m.front.public_key)
    response = await post_offer(m, mangle(body))
    assert response.status_code == 400, response.text
    assert m.front.keys.count(VALIDATOR.ss58_address) == 0


async def test_keys_are_bounded_per_validator_oldest_dropped(miner) -> None:
    m = miner(max_keys_per_validator=3)
    validator = m.validator()
    sessions = []
    for _ in range(5):
        await validator.handshake()
        sessions.append(validator.session)
    assert m.front.keys.count(VALIDATOR.ss58_address) == 3
    statuses = []
    for session in sessions:
        token = session.fernet.encrypt(json.dumps(CHALLENGE).encode())
        statuses.append((await validator.post(token, key_id=session.key_id)).status_code)
    assert statuses == [401, 401, 200, 200, 200]


async def test_keys_expire_after_the_validators_ttl(miner) -> None:
    m = miner()
    validator = m.validator()
    await validator.handshake()
    m.clock.shift = KEY_TTL + 1
    response = await validator.post(validator.session.fernet.encrypt(b"{}"))
    assert response.status_code == 401 and "no live key" in response.json()["detail"]


# -- the challenge's refusals


def assert_asks_for_a_handshake(response: httpx.Response, miner: Miner) -> None:
    body = response.json()
    assert response.status_code == 401 and body["requires_handshake"] is True
    assert body["public_key"] == miner.front.public_key


async def test_an_unknown_key_asks_for_a_handshake_which_the_validator_does_inline(miner) -> None:
    m = miner()
    validator = m.validator()
    await validator.handshake()
    validator.session = Session(validator.session.fernet, "not-a-known-uuid", validator.session.expires)
    response = await validator.post(b"anything")
    assert_asks_for_a_handshake(response, m)
    m.calls.clear()
    reply = await validator.ask(CHALLENGE)
    assert reply.ok and reply.answer["response_text"] == TEXT
    assert m.calls == [  # no GET of the public key: it came with the 401
        ("POST", "/fiber/challenge", 401), ("POST", "/fiber/key-exchange", 200), ("POST", "/fiber/challenge", 200),
    ]


async def test_another_validators_key_is_refused(miner) -> None:
    source = FakeSource(WORDS)
    m = miner(source)
    owner = m.validator()
    await owner.handshake()
    token = owner.session.fernet.encrypt(json.dumps(CHALLENGE).encode())
    response = await owner.post(token, hotkey=OTHER.ss58_address)
    assert_asks_for_a_handshake(response, m)
    assert source.seen == []


async def test_a_body_not_under_the_key_asks_for_a_handshake_and_the_retry_succeeds(miner) -> None:
    source = FakeSource(WORDS)
    m = miner(source)
    validator = m.validator()
    await validator.handshake()
    assert_asks_for_a_handshake(await validator.post(b"garbage"), m)
    validator.session = Session(Fernet(Fernet.generate_key()), validator.session.key_id, validator.session.expires)
    reply = await validator.ask(CHALLENGE)
    assert reply.ok and validator.handshakes == 2 and len(source.seen) == 1


async def test_a_stale_token_asks_for_a_handshake(miner) -> None:
    m = miner()
    validator = m.validator()
    await validator.handshake()
    stale = validator.session.fernet.encrypt_at_time(json.dumps(CHALLENGE).encode(), int(time.time() - WINDOW - 5))
    assert_asks_for_a_handshake(await validator.post(stale), m)


async def test_a_replayed_challenge_is_refused_without_reaching_the_model(miner) -> None:
    source = FakeSource(WORDS)
    m = miner(source)
    validator = m.validator()
    await validator.handshake()
    token = validator.session.fernet.encrypt(json.dumps(CHALLENGE).encode())
    assert (await validator.post(token)).status_code == 200
    # Fernet's base64 decoder skips stray bytes: the same token dressed differently is the same token
    for replay in (token, token + b"\n", b" " + token + b"!"):
        response = await validator.post(replay)
        assert response.status_code == 409 and "already" in response.json()["detail"]
    assert len(source.seen) == 1


async def test_an_oversized_body_is_a_413_before_decryption(miner) -> None:
    source = FakeSource(WORDS)
    m = miner(source, max_body_bytes=1000)
    validator = m.validator()
    await validator.handshake()
    assert (await validator.post(b"x" * 1001)).status_code == 413
    reply = await validator.ask({**CHALLENGE, "prompt": "y" * 1000})
    assert reply.status == 413 and source.seen == []


async def test_the_rate_limit_is_a_429(miner) -> None:
    source = FakeSource(WORDS)
    validator = miner(source, per_minute=1).validator()
    assert (await validator.ask(CHALLENGE)).ok
    reply = await validator.ask(CHALLENGE)
    assert reply.status == 429 and len(source.seen) == 1


async def test_a_validator_that_lost_its_permit_is_refused(miner) -> None:
    source = FakeSource(WORDS)
    m = miner(source)
    validator = m.validator()
    await validator.handshake()
    m.front.core.access.registry = Registry()  # the next snapshot of the chain no longer has it
    reply = await validator.ask(CHALLENGE)
    assert reply.status == 403 and source.seen == []


BAD_CHALLENGES: dict[str, dict] = {
    "neither prompt nor messages": {**CHALLENGE, "prompt": None},
    "prompt a number": {**CHALLENGE, "prompt": 5},
    "empty prompt": {**CHALLENGE, "prompt": " "},
    "messages a string": {**CHALLENGE, "messages": "hello"},
    "unknown role": {**CHALLENGE, "messages": [{"role": "wizard", "content": "hi"}]},
    "content an image": {**CHALLENGE, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    "temperature a string": {**CHALLENGE, "temperature": "hot"},
    "temperature infinite": {**CHALLENGE, "temperature": float("inf")},
    "max_tokens negative": {**CHALLENGE, "max_tokens": -1},
    "max_tokens a fraction": {**CHALLENGE, "max_tokens": 1.5},
    "top_p over 1": {**CHALLENGE, "top_p": 5},
}


@pytest.mark.parametrize("challenge", BAD_CHALLENGES.values(), ids=BAD_CHALLENGES.keys())
async def test_a_bad_challenge_is_a_400_without_reaching_the_model(miner, challenge: dict) -> None:
    source = FakeSource(WORDS)
    reply = await miner(source).validator().ask(challenge)
    assert reply.status == 400 and source.seen == [], reply


async def test_a_challenge_that_is_not_json_is_a_400(miner) -> None:
    m = miner()
    validator = m.validator()
    await validator.handshake()
    assert (await validator.post(validator.session.fernet.encrypt(b"[1, 2"))).status_code == 400


async def test_missing_headers_are_a_400(miner) -> None:
    response = await miner().client.post("/fiber/challenge", content=b"x")
    assert response.status_code == 400


# -- secrets, flags


async def test_neither_the_private_key_nor_a_symmetric_key_nor_the_prompt_is_logged(miner, caplog) -> None:
    m = miner()
    validator = m.validator()
    private = RSA_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    prompt = "my very own prompt, not for the logs"
    bt.logging.set_debug(True)
    try:
        with caplog.at_level("DEBUG"):
            body, key = key_exchange(VALIDATOR, m.front.public_key)
            assert (await post_offer(m, body)).status_code == 200
            validator.session = Session(Fernet(key), body["symmetric_key_uuid"], time.time() + KEY_TTL)
            assert (await validator.ask({**CHALLENGE, "prompt": prompt})).ok
            await post_offer(m, body)  # replayed nonce
            await post_offer(m, {**key_exchange(STRANGER, m.front.public_key)[0]})
            await validator.post(b"garbage", key_id="unknown")
    finally:
        bt.logging.set_debug(False)
    assert "loosh: refused" in caplog.text and "refused 1 requests" in caplog.text  # the logs were captured
    secrets = [key.decode(), *private.splitlines()[1:-1]]
    assert not any(secret in caplog.text for secret in secrets)
    assert not any(prompt in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def test_flags_and_their_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_args(parser)
    defaults = vars(parser.parse_args([]))
    assert defaults == {
        "loosh.port": None, "loosh.host": "0.0.0.0", "loosh.timeout": DEFAULT_TIMEOUT, "loosh.max_keys_per_validator": 16,
    }
    asked = vars(parser.parse_args(["--loosh.port", "8091", "--loosh.timeout", "30"]))
    assert asked["loosh.port"] == 8091 and asked["loosh.timeout"] == 30.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--loosh.timeout", "0"])
