"""One-off generator for vectors.json: btauth/1 requests signed by bittensor 11's own code.

Run only in a bittensor 11 environment (this project pins bittensor 10), from anywhere:
    python3 -m venv /tmp/bt11 && /tmp/bt11/bin/pip install 'bittensor>=11,<12'
    /tmp/bt11/bin/python tests/vectors/btauth1/make_vectors.py
Keys are the public development URIs (//Alice, ...), never real key material. Each case is also
checked with bittensor 11's own verify() and the outcome recorded.
"""

import json
from pathlib import Path

import bittensor
from bittensor import http_auth
from bittensor_core import Keypair

CASES = [
    ("post_json", "//Alice", "//Bob", "POST", "/v1/chat/completions",
     b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}', 1_735_689_600_000_000_000),
    ("get_query_empty_body", "//Alice", "//Bob", "GET", "/availability?task=inference&n=2",
     b"", 1_735_689_601_123_456_789),
    ("lowercase_method_binary_body", "//Bob", "//Alice", "post", "/v1/x%20y?q=%C3%A9",
     bytes(range(256)), 1_735_689_602_000_000_001),
    ("utf8_body_other_receiver", "//Charlie", "//Dave", "PUT", "/v1/completions?",
     "héllo ✓ \n\r\t".encode(), 1_735_689_603_999_999_999),
    ("unbound_receiver", "//Alice", None, "POST", "/v1/chat/completions", b"{}", 1_735_689_604_000_000_000),
]


def main() -> None:
    cases = []
    for name, sender_uri, receiver_uri, method, target, body, nonce in CASES:
        sender = Keypair.create_from_uri(sender_uri)
        receiver = Keypair.create_from_uri(receiver_uri).ss58_address if receiver_uri else None
        headers = http_auth.sign(sender, method=method, path=target, body=body, receiver_ss58=receiver, nonce_ns=nonce)
        payload = http_auth.build_payload(scheme="sr25519", method=method, path=target, body=body,
                                          nonce_ns=nonce, sender_ss58=sender.ss58_address, receiver_ss58=receiver)
        try:
            http_auth.verify(headers, body, method=method.upper(), path=target,
                             self_hotkey_ss58=receiver or sender.ss58_address,
                             nonce_store=http_auth.InMemoryNonceStore(), now_ns=nonce + 1_000_000_000)
            outcome = "ok"
        except http_auth.AuthError as error:
            outcome = type(error).__name__
        cases.append({
            "name": name, "sender_uri": sender_uri, "sender_ss58": sender.ss58_address,
            "receiver_uri": receiver_uri, "receiver_ss58": receiver, "method": method, "target": target,
            "body_hex": body.hex(), "nonce": nonce, "headers": headers, "payload": payload.decode(),
            "bittensor_verify": outcome,
        })
    out = {"generator": f"bittensor {bittensor.__version__} bittensor.http_auth.sign (tests/vectors/btauth1/make_vectors.py)",
           "cases": cases}
    path = Path(__file__).with_name("vectors.json")
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
