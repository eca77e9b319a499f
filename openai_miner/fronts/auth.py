"""Who signed an HTTP request: Epistula v2 (SN1's validators) and btauth/1 (bittensor 11).

Checking comes in two steps so that a front can refuse cheaply: :meth:`Authenticator.claim`
reads the headers (scheme, version, receiver, freshness, an already-seen nonce) without any
signature work, the front then looks the claimed hotkey up in its access policy, and only then
:meth:`Authenticator.verify` checks the sr25519 signature and remembers the nonce. A nonce is
remembered only after its signature verified, so a stranger cannot burn a validator's nonces.
Reasons are short and never echo a header, so they are safe to send back.

The signers (:func:`epistula_headers`, :func:`btauth_headers`) are the validator's side, used by
the test kit; btauth/1 is implemented from its spec and pinned by vectors that bittensor 11's
own ``http_auth.sign`` made (``tests/vectors/btauth1``).
"""

import hashlib
import threading
import time
import uuid as uuids
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

from bittensor_wallet import Keypair

EPISTULA = "epistula/2"
BTAUTH = "btauth/1"
# (seconds back, seconds ahead) a signature stays good: SN1 took 8 s back; btauth/1 says 10 and 2.
WINDOWS = {EPISTULA: (8.0, 2.0), BTAUTH: (10.0, 2.0)}
CRYPTO = {"sr25519": 1, "ed25519": 0}  # btauth/1's X-Bittensor-Crypto names; absent means sr25519


class AuthError(Exception):
    """A request that is not (validly) signed for this miner: an HTTP status and a safe reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Claim:
    """What a request's headers claim, parsed and checked for freshness, not yet verified."""

    scheme: str
    hotkey: str
    receiver: str | None
    nonce: str
    message: bytes  # the exact bytes the signature covers
    signature: bytes
    crypto_type: int = 1


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _hex(value: str, name: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise AuthError(401, f"{name} is not hex") from None


def btauth_payload(
    method: str, target: str, body: bytes, nonce: int, sender: str, receiver: str | None, scheme: str = "sr25519"
) -> bytes:
    """The bytes btauth/1 signs: newline-joined protocol, scheme, METHOD, target, body hash, nonce,
    sender and receiver (``-`` when unbound)."""
    lines = (BTAUTH, scheme, method.upper(), target, hashlib.sha256(body).hexdigest(), str(nonce), sender, receiver or "-")
    return "\n".join(lines).encode()


def epistula_message(body: bytes, uuid: str, timestamp: str, signed_for: str) -> bytes:
    """The bytes Epistula v2 signs: ``sha256(body).uuid.timestamp.signed_for``."""
    return f"{hashlib.sha256(body).hexdigest()}.{uuid}.{timestamp}.{signed_for}".encode()


class Authenticator:
    """Checks requests signed for ``receiver`` (this miner's hotkey); remembers accepted nonces."""

    def __init__(
        self, receiver: str, *, clock: Callable[[], float] = time.time, replay_capacity: int = 100_000
    ) -> None:
        self.receiver = receiver
        self._clock = clock
        self._capacity = replay_capacity
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()  # key -> when it expires
        self._lock = threading.Lock()

    def claim(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Claim:
        """The request's claim, or :class:`AuthError`: no signature work, cheapest checks first."""
        lowered = _headers(headers)
        if "x-bittensor-signature" in lowered or "x-bittensor-version" in lowered:
            claim, sent_at = self._btauth(method, target, lowered, body)
        elif "epistula-request-signature" in lowered or "epistula-version" in lowered:
            claim, sent_at = self._epistula(lowered, body)
        else:
            raise AuthError(401, "unsigned request: Epistula v2 or btauth/1 headers are required")
        if claim.receiver != self.receiver:
            raise AuthError(400, "signed for another hotkey than this miner's")
        back, ahead = WINDOWS[claim.scheme]
        age = self._clock() - sent_at
        if age > back:
            raise AuthError(401, f"stale signature: older than {back:g}s")
        if -age > ahead:
            raise AuthError(401, f"signature from the future: more than {ahead:g}s ahead")
        if self._key(claim) in self._seen:
            raise AuthError(401, "replayed request: this nonce was already accepted")
        return claim

    def verify(self, claim: Claim) -> str:
        """The hotkey, once its signature is checked and its nonce remembered; else :class:`AuthError`."""
        try:
            keypair = Keypair(ss58_address=claim.hotkey, crypto_type=claim.crypto_type)
            valid = keypair.verify(claim.message, claim.signature)
        except (ValueError, TypeError):
            raise AuthError(401, "bad signature: the hotkey or signature cannot be decoded") from None
        if not valid:
            raise AuthError(401, "bad signature: it does not verify against the claimed hotkey")
        now = self._clock()
        key = self._key(claim)
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) <= now or len(self._seen) >= self._capacity):
                self._seen.popitem(last=False)
            if key in self._seen:  # the same request twice at once: only the first passes
                raise AuthError(401, "replayed request: this nonce was already accepted")
            self._seen[key] = now + sum(WINDOWS[claim.scheme])
        return claim.hotkey

    @staticmethod
    def _key(claim: Claim) -> tuple[str, str, str]:
        return (claim.scheme, claim.hotkey, claim.nonce)

    def _epistula(self, headers: dict[str, str], body: bytes) -> tuple[Claim, float]:
        if headers.get("epistula-version") != "2":
            raise AuthError(401, "unsupported Epistula-Version (expected 2)")
        values = {}
        for name in ("timestamp", "uuid", "signed-by", "signed-for", "request-signature"):
            value = headers.get(f"epistula-{name}")
            if not value:
                raise AuthError(401, f"missing Epistula-{name.title()}")
            values[name] = value
        try:
            sent_at = int(values["timestamp"]) / 1000
        except ValueError:
            raise AuthError(401, "Epistula-Timestamp is not milliseconds") from None
        claim = Claim(
            scheme=EPISTULA,
            hotkey=values["signed-by"],
            receiver=values["signed-for"],
            nonce=values["uuid"],
            message=epistula_message(body, values["uuid"], values["timestamp"], values["signed-for"]),
            signature=_hex(values["request-signature"], "Epistula-Request-Signature"),
        )
        return claim, sent_at

    def _btauth(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[Claim, float]:
        if headers.get("x-bittensor-version") != "1":
            raise AuthError(401, "unsupported X-Bittensor-Version (expected 1)")
        sender, nonce = headers.get("x-bittensor-hotkey"), headers.get("x-bittensor-nonce")
        signature = headers.get("x-bittensor-signature")
        if not sender or not nonce or not signature:
            raise AuthError(401, "missing X-Bittensor-Hotkey, -Nonce or -Signature")
        if not nonce.isdigit():
            raise AuthError(401, "X-Bittensor-Nonce is not a decimal integer")
        scheme = headers.get("x-bittensor-crypto", "sr25519")
        if scheme not in CRYPTO:
            raise AuthError(401, "unsupported X-Bittensor-Crypto")
        receiver = headers.get("x-bittensor-receiver")
        claim = Claim(
            scheme=BTAUTH,
            hotkey=sender,
            receiver=receiver,
            nonce=nonce,
            message=btauth_payload(method, target, body, int(nonce), sender, receiver, scheme),
            signature=_hex(signature, "X-Bittensor-Signature"),
            crypto_type=CRYPTO[scheme],
        )
        return claim, int(nonce) / 1e9


def epistula_headers(
    keypair: Keypair, body: bytes, signed_for: str, *, now: float | None = None, uuid: str | None = None
) -> dict[str, str]:
    """Epistula v2 headers signing ``body`` for the hotkey ``signed_for``, as SN1's validators sent them."""
    timestamp = str(round((time.time() if now is None else now) * 1000))
    nonce = uuid or str(uuids.uuid4())
    signature = keypair.sign(epistula_message(body, nonce, timestamp, signed_for))
    return {
        "Epistula-Version": "2",
        "Epistula-Timestamp": timestamp,
        "Epistula-Uuid": nonce,
        "Epistula-Signed-By": keypair.ss58_address,
        "Epistula-Signed-For": signed_for,
        "Epistula-Request-Signature": "0x" + signature.hex(),
    }


def btauth_headers(
    keypair: Keypair, method: str, target: str, body: bytes, receiver: str | None, *, nonce: int | None = None
) -> dict[str, str]:
    """btauth/1 headers for an sr25519 hotkey, as bittensor 11's ``http_auth.sign`` makes them."""
    nonce = time.time_ns() if nonce is None else nonce
    signature = keypair.sign(btauth_payload(method, target, body, nonce, keypair.ss58_address, receiver))
    headers = {
        "X-Bittensor-Version": "1",
        "X-Bittensor-Hotkey": keypair.ss58_address,
        "X-Bittensor-Nonce": str(nonce),
        "X-Bittensor-Signature": "0x" + signature.hex(),
    }
    if receiver is not None:
        headers["X-Bittensor-Receiver"] = receiver
    return headers
