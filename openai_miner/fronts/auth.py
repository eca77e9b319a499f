"""Who signed an HTTP request: the two schemes validators use, checked in two steps.

Validators sign their HTTP requests to miners with Epistula v2 (SN1 ``shared/epistula.py``) or
btauth/1 (bittensor 11 ``bittensor/http_auth.py``); this module signs and verifies both, with
bittensor 10's ``bittensor_wallet``. :meth:`Authenticator.claim` reads what the headers claim
without any cryptography, so the front can look the claimed hotkey up first and a stranger's flood
costs no sr25519 work; :meth:`Authenticator.verify` then checks the signature. A freshness window
and a bounded replay cache keep a captured request from being accepted twice.
"""

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from uuid import uuid4

from bittensor_wallet import Keypair

EPISTULA = "epistula/2"
BTAUTH = "btauth/1"
SR25519 = 1  # bittensor_wallet's crypto_type for sr25519
# How far (seconds back, seconds ahead of our clock) a signed timestamp may be, per scheme.
WINDOWS: dict[str, tuple[float, float]] = {EPISTULA: (8.0, 2.0), BTAUTH: (10.0, 2.0)}
# After this long a remembered request would be refused as stale anyway, in either scheme.
REPLAY_RETENTION = max(back + ahead for back, ahead in WINDOWS.values())

_DIGITS = re.compile(r"[0-9]{1,20}")
_UUID = re.compile(r"[0-9A-Za-z-]{1,64}")  # uuid4 in practice; never a "." (the separator)
_SS58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,60}")  # base58 alphabet; decoded in verify()
_SIGNATURE = re.compile(r"(?:0x)?([0-9a-fA-F]{128})")  # 64 bytes, hex, "0x" optional


class AuthError(Exception):
    """A refused request: ``status`` for the response, ``reason`` short and safe to send back."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Claim:
    """What a request's headers claim, well-formed, fresh and for us, but not yet verified."""

    scheme: str  # EPISTULA or BTAUTH
    hotkey: str  # the claimed sender's ss58
    receiver: str | None  # the hotkey it was signed for (always ours once claim() returns)
    nonce: str  # the replay key: Epistula's uuid, btauth's decimal nonce
    message: bytes = field(repr=False)  # the exact bytes the sender must have signed
    signature: bytes = field(repr=False)


class Authenticator:
    """Checks signed requests for one receiving hotkey; thread-safe."""

    def __init__(
        self, receiver: str, *, clock: Callable[[], float] = time.time, replay_capacity: int = 100_000
    ) -> None:
        self.receiver = receiver
        self._clock = clock
        self._capacity = replay_capacity
        # (scheme, hotkey, nonce) -> when to forget it; insertion order is expiry order.
        self._seen: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def claim(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Claim:
        """Parse and cheaply check the signature headers of a request, or raise :class:`AuthError`.

        ``target`` is the request target as sent (raw path plus ``?query``), ``body`` the raw bytes;
        Epistula signs neither method nor target. Header names are matched case-insensitively.
        """
        lowered = {name.lower(): value for name, value in headers.items()}
        epistula = any(name.startswith("epistula-") for name in lowered)
        btauth = any(name.startswith("x-bittensor-") for name in lowered)
        if epistula == btauth:
            raise AuthError(401, "two signature schemes" if epistula else "unsigned request")
        if epistula:
            claim = self._epistula(lowered, body)
        else:
            claim = self._btauth(method, target, lowered, body)
        with self._lock:
            if self._replayed(claim, self._clock()):
                raise AuthError(401, "replayed")
        return claim

    def verify(self, claim: Claim) -> str:
        """Check the claim's sr25519 signature and remember it against replays; returns the hotkey."""
        try:
            valid = Keypair(ss58_address=claim.hotkey).verify(claim.message, claim.signature)
        except ValueError:
            raise AuthError(401, "malformed hotkey") from None
        if not valid:
            raise AuthError(401, "bad signature")
        now = self._clock()
        with self._lock:  # checked again here: of two identical requests racing, one passes
            if self._replayed(claim, now):
                raise AuthError(401, "replayed")
            if len(self._seen) >= self._capacity:
                raise AuthError(503, "too many requests")  # fail closed rather than forget early
            self._seen[(claim.scheme, claim.hotkey, claim.nonce)] = now + REPLAY_RETENTION
        return claim.hotkey

    def _replayed(self, claim: Claim, now: float) -> bool:
        """Whether the claim was accepted within the retention; forgets expired entries (lock held)."""
        while self._seen:
            oldest, until = next(iter(self._seen.items()))
            if until >= now:  # kept through the window's last instant, which is still fresh
                break
            del self._seen[oldest]
        return (claim.scheme, claim.hotkey, claim.nonce) in self._seen

    def _epistula(self, headers: dict[str, str], body: bytes) -> Claim:
        if _required(headers, "Epistula-Version") != "2":
            raise AuthError(401, "unsupported Epistula-Version")
        timestamp = int(_match(_DIGITS, headers, "Epistula-Timestamp")[0])
        uuid = _match(_UUID, headers, "Epistula-Uuid")[0]
        hotkey = _match(_SS58, headers, "Epistula-Signed-By")[0]
        signature = bytes.fromhex(_match(_SIGNATURE, headers, "Epistula-Request-Signature")[1])
        self._check_receiver(headers.get("epistula-signed-for"))
        self._check_fresh(EPISTULA, timestamp, 1000)
        message = _epistula_message(body, uuid, timestamp, self.receiver)
        return Claim(EPISTULA, hotkey, self.receiver, uuid, message, signature)

    def _btauth(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Claim:
        if _required(headers, "X-Bittensor-Version") != "1":
            raise AuthError(401, "unsupported X-Bittensor-Version")
        hotkey = _match(_SS58, headers, "X-Bittensor-Hotkey")[0]
        nonce = int(_match(_DIGITS, headers, "X-Bittensor-Nonce")[0])
        # Absent means sr25519; bittensor 11 also accepts its crypto-type number.
        if headers.get("x-bittensor-crypto", "sr25519").strip().lower() not in ("sr25519", "1"):
            raise AuthError(401, "unsupported X-Bittensor-Crypto")
        signature = bytes.fromhex(_match(_SIGNATURE, headers, "X-Bittensor-Signature")[1])
        self._check_receiver(headers.get("x-bittensor-receiver"))
        self._check_fresh(BTAUTH, nonce, 10**9)
        message = _btauth_payload(method, target, body, nonce, hotkey, self.receiver)
        return Claim(BTAUTH, hotkey, self.receiver, str(nonce), message, signature)

    def _check_receiver(self, receiver: str | None) -> None:
        if receiver != self.receiver:  # absent (unbound) or "-" included
            raise AuthError(400, "signed for another hotkey")

    def _check_fresh(self, scheme: str, sent: int, per_second: int) -> None:
        back, ahead = WINDOWS[scheme]
        now = self._clock() * per_second
        if now - sent > back * per_second:
            raise AuthError(401, "stale")
        if sent - now > ahead * per_second:
            raise AuthError(401, "from the future")


def epistula_headers(
    keypair: Keypair, body: bytes, signed_for: str, *, now: float | None = None, uuid: str | None = None
) -> dict[str, str]:
    """Epistula v2 headers signing ``body`` for the hotkey ``signed_for`` (as SN1's validator does)."""
    timestamp = round((time.time() if now is None else now) * 1000)
    uuid = str(uuid4()) if uuid is None else uuid
    signature = keypair.sign(_epistula_message(body, uuid, timestamp, signed_for))
    return {
        "Epistula-Version": "2",
        "Epistula-Timestamp": str(timestamp),
        "Epistula-Uuid": uuid,
        "Epistula-Signed-By": keypair.ss58_address,
        "Epistula-Signed-For": signed_for,
        "Epistula-Request-Signature": "0x" + signature.hex(),
    }


def btauth_headers(
    keypair: Keypair, method: str, target: str, body: bytes, receiver: str | None, *, nonce: int | None = None
) -> dict[str, str]:
    """btauth/1 headers as bittensor 11's ``http_auth.sign`` makes them (no Crypto header for sr25519)."""
    if keypair.crypto_type != SR25519:
        raise ValueError("btauth/1 signing here supports sr25519 keys only")
    nonce = time.time_ns() if nonce is None else nonce
    signature = keypair.sign(_btauth_payload(method, target, body, nonce, keypair.ss58_address, receiver))
    headers = {
        "X-Bittensor-Version": "1",
        "X-Bittensor-Hotkey": keypair.ss58_address,
        "X-Bittensor-Nonce": str(nonce),
        "X-Bittensor-Signature": "0x" + signature.hex(),
    }
    if receiver is not None:
        headers["X-Bittensor-Receiver"] = receiver
    return headers


def _epistula_message(body: bytes, uuid: str, timestamp: int, signed_for: str) -> bytes:
    return f"{hashlib.sha256(body).hexdigest()}.{uuid}.{timestamp}.{signed_for}".encode()


def _btauth_payload(
    method: str, target: str, body: bytes, nonce: int, sender: str, receiver: str | None
) -> bytes:
    lines = (BTAUTH, "sr25519", method.upper(), target, hashlib.sha256(body).hexdigest(), str(nonce), sender)
    return "\n".join((*lines, receiver or "-")).encode()


def _required(headers: dict[str, str], name: str) -> str:
    value = headers.get(name.lower())
    if not value:
        raise AuthError(401, f"missing {name}")
    return value


def _match(pattern: re.Pattern[str], headers: dict[str, str], name: str) -> re.Match[str]:
    found = pattern.fullmatch(_required(headers, name))
    if found is None:
        raise AuthError(401, f"malformed {name}")
    return found
