"""Request signatures: Epistula v2 and btauth/1, every refusal, replay, and bittensor 11's own vectors."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from bittensor_wallet import Keypair
from starlette.datastructures import Headers

from openai_miner.fronts.auth import (
    BTAUTH,
    EPISTULA,
    AuthError,
    Authenticator,
    Claim,
    btauth_headers,
    epistula_headers,
)

ALICE = Keypair.create_from_uri("//Alice")  # the validator
BOB = Keypair.create_from_uri("//Bob")  # this miner
CHARLIE = Keypair.create_from_uri("//Charlie")
NOW = 1_735_689_600.0
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
TARGET = "/v1/chat/completions"
SCHEMES = [EPISTULA, BTAUTH]
VECTORS = json.loads((Path(__file__).parent / "vectors/btauth1/vectors.json").read_text(encoding="utf-8"))


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_auth(clock: Clock | None = None, **kwargs: int) -> Authenticator:
    return Authenticator(BOB.ss58_address, clock=clock or Clock(), **kwargs)


def signed(
    scheme: str,
    *,
    keypair: Keypair = ALICE,
    body: bytes = BODY,
    receiver: str | None = BOB.ss58_address,
    at: float = NOW,
    uuid: str = "2f1c6a52-7d1e-4f3b-9a57-3f0c2b9d8e11",
) -> dict[str, str]:
    if scheme == EPISTULA:
        assert receiver is not None
        return epistula_headers(keypair, body, receiver, now=at, uuid=uuid)
    return btauth_headers(keypair, "POST", TARGET, body, receiver, nonce=round(at * 10**9))


def accept(auth: Authenticator, headers: dict[str, str], body: bytes = BODY, method: str = "POST",
           target: str = TARGET) -> str:
    return auth.verify(auth.claim(method, target, headers, body))


def refused(auth: Authenticator, headers: dict[str, str], status: int, reason: str, body: bytes = BODY,
            method: str = "POST", target: str = TARGET) -> None:
    with pytest.raises(AuthError) as raised:
        accept(auth, headers, body, method, target)
    assert (raised.value.status, raised.value.reason) == (status, reason)


def replace(headers: dict[str, str], name: str, value: str | None) -> dict[str, str]:
    changed = {key: val for key, val in headers.items() if key.lower() != name.lower()}
    if value is not None:
        changed[name] = value
    return changed


# Round trips and header handling


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip(scheme: str) -> None:
    auth = make_auth()
    claim = auth.claim("POST", TARGET, signed(scheme), BODY)
    assert (claim.scheme, claim.hotkey, claim.receiver) == (scheme, ALICE.ss58_address, BOB.ss58_address)
    assert auth.verify(claim) == ALICE.ss58_address


def test_claim_does_no_signature_work() -> None:
    """A forged signature passes claim() (cheap checks only) and is caught by verify()."""
    auth = make_auth()
    headers = replace(signed(BTAUTH), "X-Bittensor-Signature", "0x" + "ab" * 64)
    claim = auth.claim("POST", TARGET, headers, BODY)
    with pytest.raises(AuthError, match="bad signature"):
        auth.verify(claim)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_header_names_are_case_insensitive(scheme: str, case: Callable[[str], str]) -> None:
    headers = {case(name): value for name, value in signed(scheme).items()}
    assert accept(make_auth(), headers) == ALICE.ss58_address


@pytest.mark.parametrize("scheme", SCHEMES)
def test_starlette_headers(scheme: str) -> None:
    headers = Headers(headers=signed(scheme))
    assert accept(make_auth(), headers) == ALICE.ss58_address  # type: ignore[arg-type]


def test_signature_without_0x_and_crypto_header_accepted() -> None:
    headers = signed(BTAUTH)
    headers["X-Bittensor-Signature"] = headers["X-Bittensor-Signature"].removeprefix("0x")
    headers["X-Bittensor-Crypto"] = "SR25519"
    assert accept(make_auth(), headers) == ALICE.ss58_address


def test_epistula_does_not_sign_method_or_target() -> None:
    assert accept(make_auth(), signed(EPISTULA), method="GET", target="/other") == ALICE.ss58_address


def test_epistula_message_is_sn1s() -> None:
    """The signed string is SN1's: sha256(body).uuid.timestamp_ms.signed_for, checked the way SN1 did."""
    headers = epistula_headers(ALICE, b"{}", BOB.ss58_address, now=1_735_689_600.1234, uuid="u-1")
    assert headers["Epistula-Timestamp"] == "1735689600123"
    message = ("44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a.u-1.1735689600123."
               + BOB.ss58_address)
    assert Keypair(ss58_address=ALICE.ss58_address).verify(message, headers["Epistula-Request-Signature"])
    claim = make_auth(Clock(1_735_689_601.0)).claim("POST", "/", headers, b"{}")
    assert claim.message == message.encode()


# Refusals


def test_unsigned() -> None:
    refused(make_auth(), {"Content-Type": "application/json"}, 401, "unsigned request")


def test_both_schemes() -> None:
    refused(make_auth(), {**signed(EPISTULA), **signed(BTAUTH)}, 401, "two signature schemes")


@pytest.mark.parametrize("scheme, name, value", [
    (EPISTULA, "Epistula-Version", "1"),
    (EPISTULA, "Epistula-Version", "3"),
    (BTAUTH, "X-Bittensor-Version", "2"),
    (BTAUTH, "X-Bittensor-Version", "btauth/1"),
])
def test_unknown_version(scheme: str, name: str, value: str) -> None:
    refused(make_auth(), replace(signed(scheme), name, value), 401, f"unsupported {name}")


@pytest.mark.parametrize("scheme, name", [
    (EPISTULA, "Epistula-Version"),
    (EPISTULA, "Epistula-Timestamp"),
    (EPISTULA, "Epistula-Uuid"),
    (EPISTULA, "Epistula-Signed-By"),
    (EPISTULA, "Epistula-Request-Signature"),
    (BTAUTH, "X-Bittensor-Version"),
    (BTAUTH, "X-Bittensor-Hotkey"),
    (BTAUTH, "X-Bittensor-Nonce"),
    (BTAUTH, "X-Bittensor-Signature"),
])
@pytest.mark.parametrize("empty", [False, True])
def test_missing_header(scheme: str, name: str, empty: bool) -> None:
    refused(make_auth(), replace(signed(scheme), name, "" if empty else None), 401, f"missing {name}")


@pytest.mark.parametrize("scheme, name, value", [
    (EPISTULA, "Epistula-Timestamp", "1735689600000.5"),
    (EPISTULA, "Epistula-Timestamp", "-1735689600000"),
    (EPISTULA, "Epistula-Timestamp", "1_735_689_600_000"),
    (EPISTULA, "Epistula-Uuid", "a.b"),
    (EPISTULA, "Epistula-Uuid", "x" * 65),
    (EPISTULA, "Epistula-Signed-By", "not an address"),
    (EPISTULA, "Epistula-Request-Signature", "0x" + "zz" * 64),
    (EPISTULA, "Epistula-Request-Signature", "0x" + "ab" * 63),
    (BTAUTH, "X-Bittensor-Nonce", "1e18"),
    (BTAUTH, "X-Bittensor-Nonce", "9" * 21),
    (BTAUTH, "X-Bittensor-Hotkey", "0" * 48),
    (BTAUTH, "X-Bittensor-Signature", "ab " * 64),
])
def test_malformed_header(scheme: str, name: str, value: str) -> None:
    with pytest.raises(AuthError) as raised:
        make_auth().claim("POST", TARGET, replace(signed(scheme), name, value), BODY)
    assert (raised.value.status, raised.value.reason) == (401, f"malformed {name}")
    assert value not in str(raised.value)


def test_unsupported_crypto() -> None:
    headers = replace(signed(BTAUTH), "X-Bittensor-Crypto", "ed25519")
    refused(make_auth(), headers, 401, "unsupported X-Bittensor-Crypto")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_body_tampered(scheme: str) -> None:
    refused(make_auth(), signed(scheme), 401, "bad signature", body=BODY + b" ")


@pytest.mark.parametrize("target", ["/v1/completions", "/v1/chat/completions?x=1", "/v1/chat/completions/"])
def test_btauth_target_tampered(target: str) -> None:
    refused(make_auth(), signed(BTAUTH), 401, "bad signature", target=target)


def test_btauth_method_tampered() -> None:
    refused(make_auth(), signed(BTAUTH), 401, "bad signature", method="PUT")


def test_btauth_method_case_is_normalised() -> None:
    assert accept(make_auth(), signed(BTAUTH), method="post") == ALICE.ss58_address


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signed_by_someone_else(scheme: str) -> None:
    """Charlie signs, but claims to be Alice."""
    name = "Epistula-Signed-By" if scheme == EPISTULA else "X-Bittensor-Hotkey"
    refused(make_auth(), replace(signed(scheme, keypair=CHARLIE), name, ALICE.ss58_address), 401, "bad signature")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_malformed_hotkey(scheme: str) -> None:
    """Base58 that is no ss58 address (bad checksum) passes the cheap checks, then fails in verify()."""
    name = "Epistula-Signed-By" if scheme == EPISTULA else "X-Bittensor-Hotkey"
    bad = ALICE.ss58_address[:-1] + ("Z" if ALICE.ss58_address[-1] != "Z" else "Y")
    refused(make_auth(), replace(signed(scheme), name, bad), 401, "malformed hotkey")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_receiver(scheme: str) -> None:
    refused(make_auth(), signed(scheme, receiver=CHARLIE.ss58_address), 400, "signed for another hotkey")


@pytest.mark.parametrize("scheme, name", [(EPISTULA, "Epistula-Signed-For"), (BTAUTH, "X-Bittensor-Receiver")])
@pytest.mark.parametrize("value", [None, "", "-"])
def test_unbound_receiver(scheme: str, name: str, value: str | None) -> None:
    refused(make_auth(), replace(signed(scheme), name, value), 400, "signed for another hotkey")


def test_btauth_signed_unbound() -> None:
    refused(make_auth(), signed(BTAUTH, receiver=None), 400, "signed for another hotkey")


@pytest.mark.parametrize("scheme, back", [(EPISTULA, 8.0), (BTAUTH, 10.0)])
def test_stale(scheme: str, back: float) -> None:
    assert accept(make_auth(Clock(NOW + back)), signed(scheme)) == ALICE.ss58_address
    refused(make_auth(Clock(NOW + back + 0.01)), signed(scheme), 401, "stale")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_from_the_future(scheme: str) -> None:
    assert accept(make_auth(Clock(NOW - 2.0)), signed(scheme)) == ALICE.ss58_address
    refused(make_auth(Clock(NOW - 2.01)), signed(scheme), 401, "from the future")


# Replay


@pytest.mark.parametrize("scheme", SCHEMES)
def test_replayed(scheme: str) -> None:
    auth = make_auth()
    headers = signed(scheme)
    assert accept(auth, headers) == ALICE.ss58_address
    refused(auth, headers, 401, "replayed")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_racing_duplicates_only_one_passes(scheme: str) -> None:
    auth = make_auth()
    first, second = (auth.claim("POST", TARGET, signed(scheme), BODY) for _ in range(2))
    assert auth.verify(first) == ALICE.ss58_address
    with pytest.raises(AuthError, match="replayed"):
        auth.verify(second)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_nonce_from_another_sender_is_no_replay(scheme: str) -> None:
    auth = make_auth()
    assert accept(auth, signed(scheme)) == ALICE.ss58_address
    assert accept(auth, signed(scheme, keypair=CHARLIE)) == CHARLIE.ss58_address


@pytest.mark.parametrize("scheme, back", [(EPISTULA, 8.0), (BTAUTH, 10.0)])
def test_replay_remembered_while_fresh(scheme: str, back: float) -> None:
    """Signed 2 s ahead of our clock and replayed at the last fresh instant: still refused."""
    clock = Clock()
    auth = make_auth(clock)
    headers = signed(scheme, at=NOW + 2.0)
    assert accept(auth, headers) == ALICE.ss58_address
    clock.now = NOW + 2.0 + back
    refused(auth, headers, 401, "replayed")
    clock.now += 0.01
    refused(auth, headers, 401, "stale")


def test_replay_entries_expire_and_are_capped() -> None:
    clock = Clock()
    auth = make_auth(clock, replay_capacity=2)
    assert accept(auth, signed(EPISTULA, uuid="a")) == ALICE.ss58_address
    assert accept(auth, signed(BTAUTH)) == ALICE.ss58_address
    refused(auth, signed(EPISTULA, uuid="b"), 503, "too many requests")  # full: refuse, never forget early
    clock.now = NOW + 12.0  # the longest window: still remembered
    refused(auth, signed(EPISTULA, uuid="b", at=clock.now), 503, "too many requests")
    clock.now += 0.01  # both remembered entries expire
    for uuid in ("c", "d"):
        assert accept(auth, signed(EPISTULA, uuid=uuid, at=clock.now)) == ALICE.ss58_address
    refused(auth, signed(EPISTULA, uuid="e", at=clock.now), 503, "too many requests")


# bittensor 11's own vectors


def vector_claim(case: dict) -> tuple[Authenticator, Claim]:
    auth = Authenticator(case["receiver_ss58"] or BOB.ss58_address, clock=Clock(case["nonce"] / 1e9 + 1.0))
    return auth, auth.claim(case["method"].upper(), case["target"], case["headers"], bytes.fromhex(case["body_hex"]))


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda case: case["name"])
def test_vector_accepted(case: dict) -> None:
    sender = Keypair.create_from_uri(case["sender_uri"])
    assert sender.ss58_address == case["sender_ss58"]
    assert Keypair(ss58_address=sender.ss58_address).verify(case["payload"].encode(),
                                                            case["headers"]["X-Bittensor-Signature"])
    if case["bittensor_verify"] == "WrongReceiver":
        with pytest.raises(AuthError, match="signed for another hotkey"):
            vector_claim(case)
        return
    assert case["bittensor_verify"] == "ok"
    auth, claim = vector_claim(case)
    assert claim.message == case["payload"].encode()
    assert auth.verify(claim) == case["sender_ss58"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda case: case["name"])
def test_vector_reproduced_by_our_signer(case: dict) -> None:
    """Same headers but the (randomized) signature, which signs exactly bittensor 11's payload bytes."""
    sender = Keypair.create_from_uri(case["sender_uri"])
    ours = btauth_headers(sender, case["method"], case["target"], bytes.fromhex(case["body_hex"]),
                          case["receiver_ss58"], nonce=case["nonce"])
    signature = ours.pop("X-Bittensor-Signature")
    theirs = dict(case["headers"])
    theirs.pop("X-Bittensor-Signature")
    assert ours == theirs
    assert Keypair(ss58_address=sender.ss58_address).verify(case["payload"].encode(), signature)


def test_btauth_signer_refuses_non_sr25519_keys() -> None:
    with pytest.raises(ValueError, match="sr25519"):
        btauth_headers(Keypair.create_from_uri("//Alice", crypto_type=0), "GET", "/", b"", BOB.ss58_address)
