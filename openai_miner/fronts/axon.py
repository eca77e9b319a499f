"""The axon front: SN1's ``StreamPromptingSynapse`` over bittensor 10's axon -> the core -> ``send()``.

bittensor's axon verifies the dendrite's signature and calls the miner's blacklist, priority and
forward. This front turns a synapse into a :class:`~openai_miner.core.Question` (the deadline
counts from the request's arrival at the axon), refuses a malformed one with 400 and a reason,
and writes each batch as the text of one HTTP body chunk.

The axon is also the miner's identity on chain: whichever front is advertised, ``axon.serve()``
publishes its IP and port (:func:`chain_identity`). :class:`Front` serves it, with its door, its
gate and the forward glue, unless ``--axon.off``.

No ``from __future__ import annotations`` here: bittensor's ``Axon.attach`` compares the real
annotation objects of the functions it is given.
"""

import argparse
import time
import typing
from collections import OrderedDict
from typing import Sequence

import bittensor as bt
import fastapi
import uvicorn
from bittensor.core.axon import create_error_response
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from openai_miner.access import Access, Refusal
from openai_miner.config import add_bool
from openai_miner.core import Core, Question
from openai_miner.fronts import base
from openai_miner.messages import InvalidPrompt, checked_timeout
from openai_miner.protocol import OTHER_STRINGS, StreamPromptingSynapse, strings_at_least
from openai_miner.sources.base import Token
from openai_miner.streaming import Emit, text_of

StreamingResponse = StreamPromptingSynapse.BTStreamingResponse


class Axon(bt.Axon):
    """bittensor's axon, answering a malformed body with 400 and a reason instead of an opaque 500,
    and a body of more messages than the core takes with 413 before anything parses it."""

    def __init__(self, *args: typing.Any, access: Access, max_messages: int, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self.access = access
        self.max_messages = max_messages
        self.router.route_class = self._screening_route()  # the routes attach() adds from now on

    def screen(self, request: fastapi.Request, body: bytes) -> Response | None:
        """A 413 for a body holding more strings than ``max_messages`` messages, their roles and
        the synapse's other fields could, or ``None``.

        FastAPI and bittensor parse such a body twice as JSON and twice into a synapse and hash
        it: 45 ms of the event loop every validator shares for 100,000 one-character messages,
        only for the core to refuse them. Counting its strings takes 2 ms.
        """
        strings, most = strings_at_least(body), 2 * self.max_messages + OTHER_STRINGS
        if strings <= most:
            return None
        reason = f"over {self.max_messages} messages (--neuron.max_messages): the body holds at least {strings} strings"
        self.access.refused(client_address(request.scope), reason)
        return refusal(413, reason)

    def _screening_route(self) -> type[APIRoute]:
        """FastAPI's route, with :meth:`screen` on the raw body first. It runs after bittensor's
        middleware checked the signature and nonce from the headers: reading a body before that
        let a validator's small request overtake its large one, whose nonce was then too old."""
        screen = self.screen

        class ScreenedRoute(APIRoute):
            def get_route_handler(self) -> typing.Callable[[fastapi.Request], typing.Awaitable[Response]]:
                handler = super().get_route_handler()

                async def screened(request: fastapi.Request) -> Response:
                    refused = screen(request, await request.body())  # Starlette keeps it for FastAPI
                    return refused if refused is not None else await handler(request)

                return screened

        return ScreenedRoute

    async def verify_body_integrity(self, request: fastapi.Request) -> dict:
        try:
            return await super().verify_body_integrity(request)
        except (ValueError, TypeError, OverflowError, RecursionError) as error:
            # JSON, UTF-8, field types, body-hash mismatch; pydantic's float() of a 400-digit
            # int; nesting deeper than the interpreter's stack
            raise fastapi.HTTPException(400, f"invalid synapse body ({type(error).__name__})") from None


def client_address(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def refusal(status: int, reason: str) -> ASGIApp:
    """The response bittensor's own middleware gives a refused request: ``status``, ``reason``."""
    axon = bt.TerminalInfo(status_code=status, status_message=reason)
    return create_error_response(StreamPromptingSynapse(roles=[], messages=[], axon=axon))


class AxonDoor:
    """An ASGI middleware before bittensor's, turning away from the headers alone what bittensor
    would turn away only after its own work.

    - A hotkey the access policy refuses (or none: an unsigned request) gets the 403 bittensor
      would give, but before its middleware signs the request with the miner's hotkey (an sr25519
      signature per request) and logs an error line for it.
    - A body declared over ``max_bytes`` gets 413 before bittensor reads it whole into memory (a
      50 MB body cost the process 282 MB, never given back). One of undeclared length (chunked)
      gets 411: a dendrite always sends ``Content-Length``, and uvicorn holds a body to the length
      declared. Nothing is read here, so bittensor still checks the signature and nonce before the
      body arrives (reading it first let a validator's small request overtake its large one, whose
      nonce was then too old).

    Every refusal counts against the caller's address, and in the periodic summary
    (:meth:`~openai_miner.access.Access.refused`).
    """

    def __init__(self, app: ASGIApp, access: Access, max_bytes: int) -> None:
        self.app = app
        self.access = access
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refused = self.stranger(headers) or self.unbounded(headers)
            if refused is not None:
                self.access.refused(client_address(scope), refused.reason)
                await refusal(refused.status, refused.reason)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def stranger(self, headers: dict[bytes, bytes]) -> Refusal | None:
        claimed = headers.get(b"bt_header_dendrite_hotkey")
        return self.access.refusal(claimed.decode("latin-1") if claimed else None)

    def unbounded(self, headers: dict[bytes, bytes]) -> Refusal | None:
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return Refusal(413, f"request body over {self.max_bytes} bytes")
        if b"transfer-encoding" in headers:
            return Refusal(411, "a body needs a Content-Length")
        return None


def caller(synapse: StreamPromptingSynapse) -> tuple[str | None, int | None]:
    """The (already verified) hotkey and nonce of the validator that sent ``synapse``."""
    return (synapse.dendrite.hotkey, synapse.dendrite.nonce) if synapse.dendrite else (None, None)


class Arrivals:
    """When each admitted request reached the axon, by (hotkey, nonce), on this machine's clock.

    The answer's deadline counts from arrival, not from when ``forward`` finally runs: under load
    the axon's middleware can take tens of milliseconds, which the deadline margin must not lose.
    Entries of requests that never reach ``forward`` (refused at signature checks) age out.
    """

    def __init__(self, clock: typing.Callable[[], float] = time.monotonic, keep: float = 120.0) -> None:
        self._clock = clock
        self._keep = keep
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()

    def note(self, hotkey: str | None, nonce: int | None) -> None:
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) < now - self._keep:
            self._seen.popitem(last=False)
        self._seen[(hotkey or "", nonce or 0)] = now

    def pop(self, hotkey: str | None, nonce: int | None) -> float:
        """The arrival time, or now if the request was never noted."""
        return self._seen.pop((hotkey or "", nonce or 0), None) or self._clock()


def body_chunks(send: Send) -> Emit:
    """Each batch as one chunk of the streaming body; bittensor ends the body itself."""

    async def emit(batch: Sequence[str | Token]) -> None:
        await send({"type": "http.response.body", "body": text_of(batch).encode("utf-8"), "more_body": True})

    return emit


class AxonGate:
    """The axon's blacklist, priority and admission, on the miner's :class:`~openai_miner.access.Access`."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self.arrivals = Arrivals()

    def blacklist(self, synapse: StreamPromptingSynapse) -> tuple[bool, str]:
        hotkey, nonce = caller(synapse)
        refusal = self.access.refusal(hotkey)
        if refusal is not None:
            bt.logging.debug(f"blacklisted: {refusal.reason}")
            return True, refusal.reason
        self.arrivals.note(hotkey, nonce)
        return False, "allowed"

    def priority(self, synapse: StreamPromptingSynapse) -> float:
        return self.access.priority(caller(synapse)[0])

    def admit(self, synapse: StreamPromptingSynapse) -> None:
        """After the signature checks: rate limit and repeated prompts (429), as FastAPI's
        ``HTTPException`` (see :func:`question`), counted in the summary."""
        refused = self.access.admit(caller(synapse)[0], synapse.messages)
        if refused is not None:
            self.access.refused(None, refused.reason)
            raise fastapi.HTTPException(refused.status, refused.reason)

    def arrived(self, synapse: StreamPromptingSynapse) -> float:
        """When ``synapse`` reached the axon (now, if it was never noted)."""
        return self.arrivals.pop(*caller(synapse))


def question(core: Core, synapse: StreamPromptingSynapse, arrived: float | None = None) -> Question:
    """The synapse as the core's question, or a 400 with the reason (503 while nothing can answer).

    The 400 is FastAPI's ``HTTPException``, answered inside bittensor's middleware. bittensor's
    own exception logged an ERROR line per refusal and wrote the whole synapse into the error's
    headers (0.1 s for 100,000 messages). The refusal goes to the summary, against no address:
    the synapse's is the body's claim, not the connection's.
    """
    shut = core.closed()
    if shut is not None:
        core.access.refused(None, shut)
        raise fastapi.HTTPException(503, shut)
    try:
        messages = core.chat(synapse.roles, synapse.messages, synapse.task_name)
        timeout = checked_timeout(synapse.timeout)
    except InvalidPrompt as invalid:
        reason = f"invalid prompt: {invalid}"
        core.access.refused(None, reason)
        raise fastapi.HTTPException(400, reason) from None
    return Question(messages, core.deadline(timeout, arrived), caller(synapse)[0], front="axon")


def stream(core: Core, synapse: StreamPromptingSynapse, arrived: float | None = None) -> StreamingResponse:
    """The streaming answer to ``synapse``; its deadline counts from ``arrived`` (default: now)."""
    asked = question(core, synapse, arrived)

    async def token_streamer(send: Send) -> None:
        await core.answer(asked, body_chunks(send))

    return synapse.create_streaming_response(token_streamer)


async def whole(core: Core, synapse: StreamPromptingSynapse) -> StreamPromptingSynapse:
    """The answer to ``synapse`` in its ``completion``, not streamed."""
    asked = question(core, synapse)
    parts: list[str] = []

    async def collect(batch: Sequence[str | Token]) -> None:
        parts.append(text_of(batch))

    await core.answer(Question(asked.messages, asked.deadline, front="axon"), collect)
    synapse.completion = "".join(parts)
    return synapse


def chain_identity(wallet: bt.Wallet, config: bt.Config, access: Access) -> Axon:
    """The miner's axon, made whether or not it is served: ``serve()`` publishes the advertised
    front's IP and port on chain. On the mock chain its external IP is this machine's loopback."""
    return Axon(
        wallet=wallet,
        config=config,
        external_ip=config.axon.external_ip or ("127.0.0.1" if config.mock else None),
        access=access,
        max_messages=config.neuron.max_messages,
    )


class Front(base.Front):
    """SN1's axon: bittensor's FastAPI server behind :class:`AxonDoor`, answering through the
    miner's ``forward`` after its gate's rate limit. Served unless ``--axon.off``; its flags
    (``--axon.port``, ``--axon.external_ip``...) are bittensor's own."""

    name = "axon"
    label = "axon"
    port_flag = "--axon.port"
    switch = "no --axon.off"

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        add_bool(parser, "--axon.off", default=False, help="Serve no axon: only the other fronts (--http.port, --loosh.port).")

    @classmethod
    def enabled(cls, config: bt.Config) -> bool:
        return not config.axon.off

    @property
    def host(self) -> str:
        return self.miner.axon.fast_config.host

    @property
    def port(self) -> int:
        return self.miner.axon.port

    @property
    def published(self) -> tuple[str | None, int]:
        return self.miner.axon.external_ip, self.miner.axon.external_port

    def server(self) -> uvicorn.Server:
        """bittensor's server, once ``forward``, ``blacklist`` and ``priority`` are attached and the door is in."""
        miner = self.miner
        gate = miner.gate

        def answer(synapse: StreamPromptingSynapse) -> StreamingResponse:
            """After bittensor's signature checks: rate limit and recent repeats, then ``forward``."""
            gate.admit(synapse)
            return miner.forward(synapse)

        miner.axon.attach(forward_fn=answer, blacklist_fn=miner.blacklist, priority_fn=miner.priority)
        miner.axon.app.add_middleware(AxonDoor, access=miner.access, max_bytes=miner.config.neuron.max_body_bytes)
        return miner.axon.fast_server
