"""Recorded OpenAI traffic: how cassettes are matched, scrubbed and read back.

A cassette is replayed only for the very request it recorded: method, path and the JSON body
(model, messages, sampling), so a changed prompt or mapping fails loudly instead of replaying
the wrong answer. Credentials never reach the file.
"""

import json
from pathlib import Path
from typing import Any

from openai_miner.testing.validator import sse_events

CASSETTES = Path(__file__).resolve().parent.parent / "cassettes"
SECRET_HEADERS = ["authorization", "api-key", "openai-organization", "openai-project", "cookie"]
SCRUBBED_RESPONSE_HEADERS = {"set-cookie", "openai-organization", "openai-project", "x-request-id"}


def json_body(recorded: Any, incoming: Any) -> None:
    """vcrpy matcher: equal JSON bodies (key order and whitespace do not matter)."""
    assert _json(recorded.body) == _json(incoming.body), "request JSON body differs from the cassette"


def _json(body: bytes | str | None) -> Any:
    if not body:
        return None
    return json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)


def scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() in SCRUBBED_RESPONSE_HEADERS:
            del headers[name]
    return response


def streamed_text(sse_body: bytes | str) -> str:
    """The answer text of a recorded stream, read from its SSE body independently of the miner."""
    return "".join(
        choice.get("delta", {}).get("content") or ""
        for event in sse_events(sse_body)
        for choice in event.get("choices", [])
    )
