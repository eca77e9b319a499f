"""SN78's front in-process for the tests: the front on a core with a fake source, the keys and
clock it is given, and an httpx client on its ASGI app that records every response."""

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import bittensor as bt
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from openai_miner.access import Access, AccessPolicy, RateLimiter, RecentPrompts, Refusals
from openai_miner.chain import Neuron, Registry
from openai_miner.core import Core
from openai_miner.fronts.loosh import LooshFront
from openai_miner.system_prompts import SystemPrompts
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.loosh import LooshValidator

WORDS = [f"w{i:02d} " for i in range(10)]
TEXT = "".join(WORDS)
VALIDATOR = bt.Keypair.create_from_seed("0x" + "01" * 32)
OTHER = bt.Keypair.create_from_seed("0x" + "02" * 32)  # another registered validator
STRANGER = bt.Keypair.create_from_seed("0x" + "03" * 32)  # not registered
MINER = bt.Keypair.create_from_seed("0x" + "04" * 32)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # one for all: making one costs ~50 ms
PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode()
CHALLENGE = {  # as the validator's InferenceChallenge.model_dump(mode="json") writes it
    "prompt": "hello", "messages": None, "tools": None, "tool_choice": None, "model": "Qwen/Qwen2.5-32B-Instruct",
    "max_tokens": 12288, "temperature": 0.7, "top_p": 0.95, "correlation_id": "c-1", "created_at": "2026-03-17T10:00:00",
}


class CountingKey:
    """The miner's RSA key, counting decryptions: a refusal before RSA work leaves the count at 0."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key
        self.decrypts = 0

    def public_key(self) -> rsa.RSAPublicKey:
        return self.key.public_key()

    def decrypt(self, ciphertext: bytes, pad: Any) -> bytes:
        self.decrypts += 1
        return self.key.decrypt(ciphertext, pad)


class Clock:
    """Wall time, shifted by ``shift`` seconds: keys expire without waiting for them."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


@dataclass
class Miner:
    front: LooshFront
    key: CountingKey
    clock: Clock
    client: httpx.AsyncClient
    calls: list[tuple[str, str, int]]  # (method, path, status) of every response, in order

    def validator(self, keypair: bt.Keypair = VALIDATOR) -> LooshValidator:
        return LooshValidator(keypair, self.client)


@pytest.fixture
async def miner() -> AsyncIterator[Callable[..., Miner]]:
    """``miner(source, per_minute=600, available=..., **front_kwargs)``: the front on a core, a client."""
    clients: list[httpx.AsyncClient] = []

    def make(source: Any = None, *, per_minute: int = 600, available: Callable[[], bool] = lambda: True, **kwargs: Any) -> Miner:
        registry = Registry.of(
            Neuron(uid, keypair.ss58_address, 10.0, True) for uid, keypair in enumerate((VALIDATOR, OTHER))
        )
        access = Access(AccessPolicy(), registry, RateLimiter(per_minute), RecentPrompts(0), refusals=Refusals(every=0))
        core = Core(source or FakeSource(WORDS), access, SystemPrompts({"generic": "Be brief."}), batch_size=4)
        key, clock, calls = CountingKey(RSA_KEY), Clock(), []
        front = LooshFront(core, available, MINER.ss58_address, private_key=key, clock=clock, **kwargs)  # type: ignore[arg-type]

        async def record(response: httpx.Response) -> None:
            calls.append((response.request.method, response.request.url.path, response.status_code))

        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=front.app), base_url="http://miner", event_hooks={"response": [record]}
        )
        clients.append(client)
        return Miner(front, key, clock, client, calls)

    yield make
    for client in clients:
        await client.aclose()
