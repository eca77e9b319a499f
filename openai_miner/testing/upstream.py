"""A loopback OpenAI-compatible chat-completions server for tests, the benchmark and demos.

A real upstream is slow, paid and flaky in ways nobody chooses. This one streams the tokens it is
given at the pace it is given, fails exactly as asked (:class:`Fault`) and records what every
client did (:class:`RecordedRequest`). Offered ``tools``, it calls the ones it is given
(:class:`ToolCall`), their arguments split over chunks as OpenAI streams them; it reports usage in
every whole answer, and at a stream's end when ``stream_options.include_usage`` asks. It runs its
own event loop in a daemon thread, so sync and async callers use it alike::

    with LoopbackUpstream(tokens=["Hello", " world"], interval=0.01) as up:
        client = openai.AsyncOpenAI(base_url=up.base_url, api_key="test")

``python -m openai_miner.testing.upstream --tokens Hello " world"`` serves one by hand.
"""

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "loopback"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_json = json.JSONEncoder(separators=(",", ":")).encode  # compact, as OpenAI sends it


@dataclass(frozen=True)
class Fault:
    """What goes wrong, on the first ``times`` chat requests (on all of them when ``None``).

    ``status`` answers with that HTTP status and an OpenAI-style error body, with ``Retry-After``
    when ``retry_after`` is set. The rest shape a stream: ``drop_after`` closes the connection
    mid-body once that many tokens are out, ``no_done`` sends every token then idles without
    finishing until the client leaves or the server stops, and ``malformed_after`` sends the
    ``malformed`` bytes (by default a ``data: {not json`` line) after that many tokens (fewer than
    the stream has). ``delay_before_headers`` holds any answer back that many seconds, and
    ``interval`` paces its tokens instead of the server's ``interval`` (a slow upstream).
    """

    status: int | None = None
    retry_after: float | None = None
    times: int | None = None
    drop_after: int | None = None
    no_done: bool = False
    malformed_after: int | None = None
    malformed: bytes = b"data: {not json\n\n"
    delay_before_headers: float = 0.0
    interval: float | None = None


_NO_FAULT = Fault()


@dataclass(frozen=True)
class ToolCall:
    """A call the loopback model makes, after its text, when the request offers ``tools``.

    Streamed, its first chunk carries ``id`` and ``name`` with empty arguments, then each of
    ``arguments`` goes in a chunk of its own (as OpenAI splits them); whole, they are joined.
    """

    name: str
    arguments: Sequence[str] = ("{}",)
    id: str = "call_loopback_0"


@dataclass
class RecordedRequest:
    """One chat-completions request as the server saw it, updated live from the server thread.

    Times are ``time.monotonic()``; ``token_times`` has one per content token written to the
    socket. ``finished``: the whole response went out (up to ``[DONE]`` for a stream).
    ``disconnected``: the client left before that.
    """

    body: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    received_at: float
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    disconnected: bool = False
    ended_at: float | None = None


class LoopbackUpstream:
    """Serves ``POST /v1/chat/completions``, streamed or not, and ``GET /v1/models``.

    ``tokens`` is the answer, or a function from the request body to it; each request's
    ``max_completion_tokens`` (or ``max_tokens``) truncates it. ``fault`` may likewise be a
    function from the body to a :class:`Fault` (or ``None``), so one server can fail each request
    its own way. A stream sends its first token ``first_token_delay`` seconds after the role chunk,
    then one every ``interval`` seconds on a fixed schedule, so a busy loop catches up instead of
    drifting. An answer that is not streamed takes as long, then comes whole. ``tokens`` and
    ``fault`` may be reassigned between requests. ``tool_calls`` (or a function from the body to
    them) are made when the request offers ``tools``; its finish reason is then ``tool_calls``.
    """

    def __init__(
        self,
        *,
        tokens: Sequence[str] | Callable[[dict[str, Any]], Sequence[str]],
        interval: float = 0.0,
        first_token_delay: float = 0.0,
        fault: Fault | Callable[[dict[str, Any]], Fault | None] | None = None,
        tool_calls: Sequence[ToolCall] | Callable[[dict[str, Any]], Sequence[ToolCall]] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.tokens = tokens
        self.interval = interval
        self.first_token_delay = first_token_delay
        self.fault = fault
        self.tool_calls = tool_calls
        self.host = host
        self.requests: list[RecordedRequest] = []  # appended by the server thread
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def port(self) -> int:
        """The port listened on; until :meth:`start`, the one asked for."""
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}/v1"

    def start(self) -> "LoopbackUpstream":
        """Serve from a daemon thread; returns once the port accepts connections."""
        if self._loop is not None:
            raise RuntimeError("a LoopbackUpstream starts only once")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loopback-upstream", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close every connection, hanging streams included, and end the thread. Idempotent."""
        if self._loop is None or self._thread is None or self._loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "LoopbackUpstream":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.on_shutdown.append(self._cancel_handlers)
        # handler_cancellation: a client leaving cancels its handler, which is how a stream that
        # is idle (or between tokens) notices. shutdown_timeout bounds a request racing stop().
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self._port).start()
        self._port = self._runner.addresses[0][1]

    async def _cancel_handlers(self, app: web.Application) -> None:
        self._stopping = True
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "loopback"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
        body = await request.json()
        index = len(self.requests)
        record = RecordedRequest(
            body, {name.lower(): value for name, value in request.headers.items()}, received_at
        )
        self.requests.append(record)
        fault = self.fault(body) if callable(self.fault) else self.fault
        if fault is None or (fault.times is not None and index >= fault.times):
            fault = _NO_FAULT
        self._handlers.add(request.task)
        try:
            return await self._respond(request, record, fault, f"chatcmpl-loopback-{index}")
        except ConnectionResetError:  # wrote to a closing transport: the client left
            record.disconnected = True
            return web.Response()  # never sent; aiohttp drops the dead connection quietly
        except asyncio.CancelledError:
            record.disconnected = not self._stopping
            raise
        finally:
            record.ended_at = time.monotonic()
            self._handlers.discard(request.task)

    async def _respond(
        self, request: web.Request, record: RecordedRequest, fault: Fault, completion_id: str
    ) -> web.StreamResponse:
        await asyncio.sleep(fault.delay_before_headers)
        if fault.status is not None:
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            error = web.json_response(_error(fault.status), status=fault.status, headers=headers)
            return await _send(request, record, error)
        body = record.body
        tokens = self.tokens(body) if callable(self.tokens) else self.tokens
        tokens = tokens[: body.get("max_completion_tokens") or body.get("max_tokens")]
        calls = (self.tool_calls(body) if callable(self.tool_calls) else self.tool_calls) if body.get("tools") else ()
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", MODEL),
        }
        if body.get("stream"):
            return await self._stream(request, record, fault, tokens, calls, head)
        interval = self.interval if fault.interval is None else fault.interval
        await asyncio.sleep(self.first_token_delay + interval * max(len(tokens) - 1, 0))
        text = "".join(tokens)
        message: dict[str, Any] = {"role": "assistant", "content": None if calls and not text else text, "refusal": None}
        if calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": "".join(call.arguments)}}
                for call in calls
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls" if calls else "stop"}
        completion = {
            **head,
            "object": "chat.completion",
            "choices": [choice],
            "usage": usage(body, completion_tokens(tokens, calls)),
        }
        return await _send(request, record, web.json_response(completion))

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        fault: Fault,
        tokens: Sequence[str],
        calls: Sequence[ToolCall],
        head: dict[str, Any],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        await response.write(_chunk(head, {"role": "assistant", "content": ""}))
        frame = _logprob_frames(head, body_top_logprobs(record.body)) if record.body.get("logprobs") else _token_frames(head)
        interval = self.interval if fault.interval is None else fault.interval
        start = time.monotonic() + self.first_token_delay
        for sent, token in enumerate(tokens[: fault.drop_after]):
            if sent == fault.malformed_after:
                await response.write(fault.malformed)
            if (wait := start + sent * interval - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await response.write(frame(token))
            record.token_times.append(time.monotonic())
        if fault.drop_after is not None:
            if request.transport is not None:  # None only once the client has left
                request.transport.close()  # flushes what was written: exactly drop_after tokens
            return response
        for index, call in enumerate(calls):
            first = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            await response.write(_chunk(head, {"tool_calls": [first]}))
            for fragment in call.arguments:
                await response.write(_chunk(head, {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}))
        if fault.no_done:
            await asyncio.get_running_loop().create_future()  # until cancelled
        await response.write(_chunk(head, {}, "tool_calls" if calls else "stop"))
        if (record.body.get("stream_options") or {}).get("include_usage"):
            counted = usage(record.body, completion_tokens(tokens, calls))
            await response.write(_sse({**head, "choices": [], "usage": counted}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        record.finished = True
        return response


async def _send(
    request: web.Request, record: RecordedRequest, response: web.Response
) -> web.Response:
    await response.prepare(request)
    await response.write_eof()
    record.finished = True
    return response


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _json(payload).encode() + b"\n\n"


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _sse({**head, "choices": [choice]})


def _token_frames(head: dict[str, Any]) -> Callable[[str], bytes]:
    """``token -> _chunk(head, {"content": token})``, but 15x cheaper: the hot path of a stream."""
    before, after = _chunk(head, {"content": "\0"}).split(b'"\\u0000"')
    return lambda token: before + _json(token).encode() + after


def body_top_logprobs(body: dict[str, Any]) -> int:
    return int(body.get("top_logprobs") or 0)


def logprobs_of(token: str, top: int) -> dict[str, Any]:
    """What this server says of ``token`` when asked for logprobs: -0.25 for it, then ``top - 1``
    alternatives ``alt1``, ``alt2``... each 0.25 less likely."""

    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    alternatives = [one(token, -0.25)] + [one(f"alt{rank}", -0.25 * (rank + 1)) for rank in range(1, top)]
    return {**one(token, -0.25), "top_logprobs": alternatives[:top]}


def _logprob_frames(head: dict[str, Any], top: int) -> Callable[[str], bytes]:
    def frame(token: str) -> bytes:
        choice = {"index": 0, "delta": {"content": token}, "logprobs": {"content": [logprobs_of(token, top)]}, "finish_reason": None}
        return _sse({**head, "choices": [choice]})

    return frame


def completion_tokens(tokens: Sequence[str], calls: Sequence[ToolCall]) -> int:
    """What this server counts as an answer's tokens: its text tokens and its calls' argument fragments."""
    return len(tokens) + sum(len(call.arguments) for call in calls)


def usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    """The usage this server reports: a prompt token per whitespace-separated word of each message's content."""
    prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error(status: int) -> dict[str, Any]:
    return {
        "error": {
            "message": f"loopback fault: HTTP {status}",
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": None,
            "code": "rate_limit_exceeded" if status == 429 else None,
        }
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m openai_miner.testing.upstream",
        description="Serve a loopback OpenAI-compatible chat-completions API until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", nargs="+", default=["Hello", ",", " world", "!"])
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between tokens")
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    with LoopbackUpstream(
        tokens=args.tokens,
        interval=args.interval,
        first_token_delay=args.first_token_delay,
        host=args.host,
        port=args.port,
    ) as upstream:
        print(upstream.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
