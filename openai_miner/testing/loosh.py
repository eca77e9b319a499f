"""An SN78 validator client, behaving as Loosh's validator does (``validator/network/fiber_client_miner.py``).

Handshake: ``GET /fiber/public-key``, a fresh Fernet key under RSA-OAEP and a signed
``POST /fiber/key-exchange``; the key is then kept for an hour. Challenge: the JSON Fernet-encrypted,
``POST /fiber/challenge``, the answer decrypted. On 400 or 401 the key is dropped and the handshake
done again once, with the public key from the 401 body when it carries one, and the challenge
re-encrypted and sent again. :meth:`LooshValidator.ask` returns a :class:`LooshReply`, never raises.
"""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from bittensor_wallet import Keypair
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from openai_miner.fronts.loosh import KEY_TTL, OAEP

CHALLENGE_TIMEOUT = 300.0  # the validator's, seconds
HANDSHAKE_TIMEOUT = 30.0


@dataclass
class LooshReply:
    """What the validator got: the last HTTP status, the decrypted answer, or why not."""

    status: int | None = None
    answer: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.answer is not None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls the model made, in OpenAI's shape (none: an empty list)."""
        return (self.answer or {}).get("tool_calls") or []

    @property
    def usage(self) -> dict[str, int] | None:
        return (self.answer or {}).get("usage")


def key_exchange(
    keypair: Keypair, public_key_pem: str, *, timestamp: float | None = None, nonce: str | None = None
) -> tuple[dict[str, Any], bytes]:
    """A key-exchange body for a fresh Fernet key, signed as the validator signs it; and that key."""
    public_key = serialization.load_pem_public_key(public_key_pem.encode("utf-8"))
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("the miner's public key is not RSA")
    key = Fernet.generate_key()
    timestamp = time.time() if timestamp is None else timestamp
    nonce = nonce or str(uuid.uuid4())
    signed = f"{timestamp}.{nonce}.{keypair.ss58_address}".encode("utf-8")
    body = {
        "encrypted_symmetric_key": public_key.encrypt(key, OAEP).hex(),
        "symmetric_key_uuid": str(uuid.uuid4()),
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": "0x" + keypair.sign(signed).hex(),
        "validator_hotkey_ss58": keypair.ss58_address,
    }
    return body, key


@dataclass(frozen=True)
class Session:
    """The key the miner accepted: its Fernet, its uuid, and when the validator drops it."""

    fernet: Fernet
    key_id: str
    expires: float


class LooshValidator:
    """One validator hotkey talking to one miner at ``client``'s base URL."""

    def __init__(self, keypair: Keypair, client: httpx.AsyncClient, *, key_ttl: float = KEY_TTL) -> None:
        self.keypair = keypair
        self.client = client
        self.key_ttl = key_ttl
        self.session: Session | None = None
        self.handshakes = 0  # key exchanges the miner accepted

    async def available(self) -> bool:
        """What the validator's availability check concludes (3 s; anything but a 200 is no)."""
        try:
            response = await self.client.get(
                "/availability", headers={"validator-hotkey": self.keypair.ss58_address}, timeout=3.0
            )
            return response.status_code == 200 and response.json().get("available", False) is True
        except (httpx.HTTPError, ValueError):
            return False

    async def handshake(self, public_key_pem: str | None = None) -> httpx.Response:
        """Exchange a fresh key; the key-exchange response (a 200 means the session is set)."""
        if public_key_pem is None:
            fetched = await self.client.get("/fiber/public-key", timeout=HANDSHAKE_TIMEOUT)
            if fetched.status_code != 200:
                return fetched
            public_key_pem = fetched.json()["public_key"]
        body, key = key_exchange(self.keypair, public_key_pem)
        response = await self.client.post("/fiber/key-exchange", json=body, timeout=HANDSHAKE_TIMEOUT)
        if response.status_code == 200 and response.json().get("success") is True:
            self.session = Session(Fernet(key), body["symmetric_key_uuid"], time.time() + self.key_ttl)
            self.handshakes += 1
        return response

    async def post(self, token: bytes, *, key_id: str | None = None, hotkey: str | None = None) -> httpx.Response:
        """``POST /fiber/challenge`` of ``token`` as is, under the session's uuid unless told another."""
        headers = {
            "Content-Type": "application/octet-stream",
            "x-fiber-validator-hotkey-ss58": hotkey or self.keypair.ss58_address,
            "x-fiber-symmetric-key-uuid": key_id or (self.session.key_id if self.session else ""),
        }
        return await self.client.post("/fiber/challenge", content=token, headers=headers, timeout=CHALLENGE_TIMEOUT)

    async def ask(self, challenge: dict[str, Any]) -> LooshReply:
        """Send one challenge, handshaking first if the key is missing or old, and once more on 400/401."""
        payload = json.dumps(challenge).encode("utf-8")
        try:
            if self.session is None or time.time() > self.session.expires:
                shaken = await self.handshake()
                if self.session is None:
                    return LooshReply(shaken.status_code, error=f"handshake failed: {shaken.text[:200]}")
            response = await self.post(self.session.fernet.encrypt(payload))
            if response.status_code in (400, 401):
                self.session = None
                shaken = await self.handshake(_inline_public_key(response))
                if self.session is None:
                    return LooshReply(shaken.status_code, error=f"re-handshake failed: {shaken.text[:200]}")
                response = await self.post(self.session.fernet.encrypt(payload))
            if response.status_code != 200:
                return LooshReply(response.status_code, error=response.text[:200])
            answer = json.loads(self.session.fernet.decrypt(response.content, ttl=int(self.key_ttl)))
            return LooshReply(200, answer)
        except (httpx.HTTPError, InvalidToken, ValueError, KeyError) as error:
            return LooshReply(error=f"{type(error).__name__}: {error}")


def _inline_public_key(response: httpx.Response) -> str | None:
    """The miner's public key from a 401 that asks for a handshake (saves the ``GET``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("requires_handshake") and isinstance(body.get("public_key"), str):
        return body["public_key"]
    return None
