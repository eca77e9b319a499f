"""One validator client, for either front: a real ``bt.Dendrite`` asking for a streamed answer,
timed chunk by chunk (:func:`ask`), the same over the HTTP front with a signing httpx client
(:func:`ask_http`), or the openai SDK signing its HTTP requests (:func:`openai_client`).
:func:`sse_event` reads OpenAI's streams wherever they come from (the HTTP front, an upstream,
a recorded cassette)."""

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import aiohttp
import bittensor as bt
import httpx
import openai
from bittensor_wallet import Keypair

from openai_miner.fronts.auth import btauth_headers, epistula_headers
from openai_miner.protocol import StreamPromptingSynapse


@dataclass
class Answer:
    """What one validator saw; times are ``time.monotonic()``."""

    label: str = ""  # the caller's tag for this request
    chunks: list[str] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    status: int | None = None
    message: str = ""  # the status message
    error: str | None = None  # the client failed (an exception, never raised)
    synapse: StreamPromptingSynapse | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # HTTP: assembled from the deltas
    finish_reason: str | None = None  # HTTP
    usage: dict[str, int] | None = None  # HTTP: the final usage chunk, when asked for

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.text.strip())

    @property
    def first_chunk(self) -> float | None:
        """Seconds from the request to its first chunk."""
        return self.chunk_times[0] - self.started if self.chunk_times else None

    @property
    def total(self) -> float:
        return self.ended - self.started


def _status(synapse: StreamPromptingSynapse) -> int | None:
    try:
        return int(synapse.dendrite.status_code)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        return None


def sse_event(line: str) -> dict[str, Any] | None:
    """The JSON event of one line of an OpenAI-style SSE stream; ``None`` for any other line
    (blank, comment, ``event:``...) and for the closing ``data: [DONE]``. OpenAI sends each event
    on one ``data:`` line, which is all a chat stream needs of the SSE format."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return None if data == "[DONE]" else json.loads(data)


def sse_events(body: str | bytes) -> Iterator[dict[str, Any]]:
    """The JSON events of a whole SSE body (a recorded stream), in order."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    for line in text.splitlines():
        event = sse_event(line)
        if event is not None:
            yield event


async def ask(
    dendrite: bt.Dendrite,
    axon: bt.Axon | bt.AxonInfo,
    roles: list[str],
    messages: list[str],
    timeout: float = 10.0,
    task_name: str | None = None,
    *,
    label: str = "",
    on_chunk: Callable[[str], None] | None = None,
) -> Answer:
    """Ask ``axon`` for a streamed answer to the conversation, recording every chunk as it comes."""
    info = axon.info() if isinstance(axon, bt.Axon) else axon
    synapse = StreamPromptingSynapse(roles=roles, messages=messages, task_name=task_name)
    answer = Answer(label=label, started=time.monotonic())
    try:
        async for item in dendrite.call_stream(info, synapse, timeout=timeout, deserialize=False):
            if isinstance(item, StreamPromptingSynapse):
                answer.synapse = item
                answer.status = _status(item)
                answer.message = (item.dendrite.status_message if item.dendrite else "") or ""
                continue
            answer.chunks.append(item)
            answer.chunk_times.append(time.monotonic())
            if on_chunk is not None:
                on_chunk(item)
    except Exception as error:  # recorded, never raised: a run counts its failures
        answer.error = f"{type(error).__name__}: {error}"
    answer.ended = time.monotonic()
    return answer


async def ask_http(
    client: httpx.AsyncClient,
    port: int,
    content: str,
    timeout: float = 10.0,
    *,
    label: str = "",
    extra: dict[str, Any] | None = None,
) -> Answer:
    """Ask the HTTP front on 127.0.0.1:``port`` for a streamed answer (``client`` signs, see
    :func:`signing_client`), recording every content chunk as it comes; its tool calls (each
    call's argument fragments joined as they came), finish reason and usage chunk too; a refusal's
    reason in ``message``. ``extra``: more fields of the body (``tools``, ``stream_options``...)."""
    body = {"model": "any", "messages": [{"role": "user", "content": content}], "stream": True, **(extra or {})}
    answer = Answer(label=label, started=time.monotonic())
    try:
        async with client.stream(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
            headers={"X-Client-Timeout": str(timeout)}, timeout=timeout + 5,
        ) as response:
            answer.status = response.status_code
            if response.status_code != 200:  # a refusal: its OpenAI-style reason
                await response.aread()
                answer.message = str(((_json_or_none(response) or {}).get("error") or {}).get("message", ""))
                answer.ended = time.monotonic()
                return answer
            async for line in response.aiter_lines():
                event = sse_event(line)
                if event is None:
                    continue
                answer.usage = event.get("usage") or answer.usage
                choices = event.get("choices") or [{}]
                delta = choices[0].get("delta") or {}
                answer.finish_reason = choices[0].get("finish_reason") or answer.finish_reason
                for piece in delta.get("tool_calls") or ():
                    _add_piece(answer.tool_calls, piece)
                text = delta.get("content")
                if text:
                    answer.chunks.append(text)
                    answer.chunk_times.append(time.monotonic())
    except Exception as error:  # recorded, never raised: a run counts its failures
        answer.error = f"{type(error).__name__}: {error}"
    answer.ended = time.monotonic()
    return answer


def _json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _add_piece(calls: list[dict[str, Any]], piece: dict[str, Any]) -> None:
    """Adds a streamed ``delta.tool_calls`` piece to the calls so far, as OpenAI's clients do."""
    while len(calls) <= piece["index"]:
        calls.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
    call, function = calls[piece["index"]], piece.get("function") or {}
    call["id"] = call["id"] or piece.get("id")
    call["function"]["name"] = call["function"]["name"] or function.get("name")
    call["function"]["arguments"] += function.get("arguments") or ""


async def post_signed(
    session: aiohttp.ClientSession,
    dendrite: bt.Dendrite,
    axon: bt.Axon,
    messages: list[str],
    timeout: float = 30,
) -> aiohttp.ClientResponse:
    """A validator's request sent by hand, so a caller can hang up whenever it likes."""
    synapse = dendrite.preprocess_synapse_for_request(
        axon.info(), StreamPromptingSynapse(roles=["user"] * len(messages), messages=messages), timeout
    )
    return await session.post(
        f"http://127.0.0.1:{axon.port}/StreamPromptingSynapse",
        headers=synapse.to_headers(), json=synapse.model_dump(),
    )


def signing_client(
    keypair: Keypair,
    receiver: str,
    *,
    scheme: str = "epistula",
    timeout: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An httpx client that signs every request for ``receiver`` as a validator would.

    SN1's validators (v2.13 on) gave such a client to ``openai.AsyncOpenAI`` (``http_client=``)
    and signed in a request hook with Epistula v2; bittensor 11 clients sign with btauth/1.
    ``transport``: ``httpx.ASGITransport(app=...)`` asks a front's app in-process, no port.
    """

    async def sign(request: httpx.Request) -> None:
        body = request.read()
        if scheme == "epistula":
            request.headers.update(epistula_headers(keypair, body, receiver))
        else:
            target = request.url.raw_path.decode("ascii")
            request.headers.update(btauth_headers(keypair, request.method, target, body, receiver))

    return httpx.AsyncClient(event_hooks={"request": [sign]}, timeout=timeout, transport=transport)


def openai_client(
    to: int | httpx.AsyncBaseTransport, keypair: Keypair, receiver: str, *, scheme: str = "epistula", timeout: float = 30.0
) -> openai.AsyncOpenAI:
    """The openai SDK asking a miner's HTTP front, signing like a validator: ``to`` is its port on
    127.0.0.1, or a transport that drives its app in-process (``httpx.ASGITransport(app=...)``)."""
    transport = None if isinstance(to, int) else to
    return openai.AsyncOpenAI(
        base_url=f"http://{'127.0.0.1:' + str(to) if transport is None else 'miner'}/v1", api_key="Apex", max_retries=0,
        http_client=signing_client(keypair, receiver, scheme=scheme, timeout=timeout, transport=transport),
    )
