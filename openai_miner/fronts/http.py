"""The HTTP front: signed OpenAI-compatible ``/v1/chat/completions`` -> the core -> SSE chunks.

What SN1 validators from v2.13 on, and bittensor 11 clients, call: OpenAI's chat body (plus SN1's
``task``, ``timeout``, ``sampling_parameters``), signed with Epistula v2 or btauth/1 headers.
Every refusal comes before any model work, cheapest first, with an OpenAI-style JSON error: too
large (413), unsigned or badly signed (401), signed for another hotkey (400), a hotkey the access
policy refuses (403, looked up before the signature is checked, so a stranger's flood costs no
signature work), rate-limited (429), a malformed body (400). ``POST /availability`` (unsigned)
says which tasks and models this miner takes; ``GET /health`` is for process managers.
"""

import argparse
import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

import bittensor as bt
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from openai_miner.config import add_bool, at_least
from openai_miner.core import Core, Question, Refused
from openai_miner.fronts import base
from openai_miner.fronts.auth import Authenticator, AuthError
from openai_miner.messages import MAX_TIMEOUT, MAX_TOOL_CALLS, InvalidPrompt
from openai_miner.sources.base import Sampling, Token, ToolCallDelta
from openai_miner.streaming import Piece, StreamResult, text_of, tool_calls_of
from openai_miner.system_prompts import task_key

UNTEMPLATED = frozenset({task_key("InferenceTask")})  # scored token by token against a reference model
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def add_args(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--http.port", type=at_least(1), default=None,
        help="Serve the signed OpenAI-compatible front (/v1/chat/completions) on this port (off when unset).",
    )
    parser.add_argument("--http.host", type=str, default="0.0.0.0", help="Address the HTTP front listens on.")
    add_bool(
        parser, "--http.advertise", default=False,
        help="Publish the HTTP front's port on chain instead of the axon's (what SN1 v2.13+ validators "
        "dial): the same as --advertise http.",
    )
    parser.add_argument(
        "--http.tasks", type=str, nargs="*", default=["InferenceTask", "MSRv2Task"], metavar="TASK",
        help="Tasks /availability says this miner takes (WebRetrievalTask needs live web search).",
    )


def refusal(status: int, reason: str) -> JSONResponse:
    kind = "invalid_request_error" if status in (400, 413) else "authentication_error" if status == 401 else "refused"
    return JSONResponse({"error": {"message": reason, "type": kind, "code": status}}, status_code=status)


@dataclass(frozen=True)
class ChatRequest:
    """The parts of an OpenAI chat body the core needs.

    ``extras``: each message's tool-conversation fields (``tool_calls``, ``tool_call_id``), or
    none when no message has any. ``include_usage``: a streamed answer ends with a usage chunk.
    """

    roles: list[str]
    contents: list[str]
    model: str | None
    stream: bool
    task: str | None
    timeout: float | None
    sampling: Sampling
    extras: tuple[dict[str, Any], ...] = ()
    include_usage: bool = False


INT32 = 2**31 - 1
INT64 = 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """What a numeric field may be: ``kind`` (``int`` takes a whole float too), ``low`` to ``high``."""

    kind: type
    low: float
    high: float


# The upper bounds are what the OpenAI API, vLLM and torch take: a token count or top-k in an
# int32, a seed in an int64 (OpenAI; torch.manual_seed), top_p a probability, at most 20
# alternatives (OpenAI's limit; torch.topk fails past the vocabulary), a temperature far past
# any useful one (OpenAI's limit is 2).
BOUNDS = {
    "temperature": Bound(float, 0, 100),
    "top_p": Bound(float, 0, 1),
    "top_k": Bound(int, 0, INT32),
    "max_tokens": Bound(int, 1, INT32),
    "max_completion_tokens": Bound(int, 1, INT32),
    "max_new_tokens": Bound(int, 1, INT32),
    "seed": Bound(int, -INT64 - 1, INT64),
    "top_logprobs": Bound(int, 0, 20),
    "timeout": Bound(float, 0, MAX_TIMEOUT),
}


def _number(body: Mapping[str, Any], name: str) -> Any:
    """``body[name]`` within its :data:`BOUNDS`, ``None`` if absent; a reason if it is not.

    JSON numbers arrive as ints of any size (``float()`` of one past 1e308 overflows) and as
    floats that may be infinite or NaN (``1e400``, ``NaN``); both are compared, never converted,
    until they are known to be in bounds.
    """
    value, bound = body.get(name), BOUNDS[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidPrompt(f"{name} must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidPrompt(f"{name} must be a finite number")
    if bound.kind is int and isinstance(value, float) and not value.is_integer():
        raise InvalidPrompt(f"{name} must be a whole number")
    if not bound.low <= value <= bound.high:
        raise InvalidPrompt(f"{name} must be from {bound.low} to {bound.high}")
    return bound.kind(value)


def _unicode(text: str) -> bool:
    """Whether ``text`` can be written back as UTF-8: JSON's ``"\\ud800"`` decodes to a lone
    surrogate, which cannot (and a response echoing one failed with a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _content(value: Any, index: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts;
    none (an assistant's tool call) is empty, which only a tool call or a tool's result may be."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(part.get("text", "")) for part in value)
    raise InvalidPrompt(f"message {index} content must be text")


def parse_chat(body: Any) -> ChatRequest:
    """An OpenAI chat body (with SN1's additions) as a :class:`ChatRequest`; a reason if it is not one."""
    if not isinstance(body, dict):
        raise InvalidPrompt("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidPrompt("messages must be a list of {role, content} objects")
    roles = [m.get("role") if isinstance(m.get("role"), str) else repr(m.get("role")) for m in messages]
    contents = [_content(m.get("content"), i) for i, m in enumerate(messages)]
    extras = tuple({k: m[k] for k in TURN_FIELDS if m.get(k) is not None} for m in messages)
    tools, tool_choice = _tools(body)
    stream_options = body.get("stream_options")
    if stream_options is not None and not (
        isinstance(stream_options, dict) and isinstance(stream_options.get("include_usage", False), bool)
    ):
        raise InvalidPrompt("stream_options must be an object whose include_usage is true or false")
    extra = body.get("sampling_parameters") or {}
    if not isinstance(extra, dict):
        raise InvalidPrompt("sampling_parameters must be an object")
    merged = {**extra, **{k: v for k, v in body.items() if v is not None}}  # the body's own fields win
    stop = merged.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise InvalidPrompt("stop must be a string or a list of strings")
    logprobs = merged.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidPrompt("logprobs must be true or false")
    top = _number(merged, "top_logprobs")
    max_tokens = _number(merged, "max_tokens") or _number(merged, "max_completion_tokens")
    sampling = Sampling(
        temperature=_number(merged, "temperature"),
        top_p=_number(merged, "top_p"),
        top_k=_number(merged, "top_k"),
        max_tokens=max_tokens or _number(merged, "max_new_tokens"),
        seed=_number(merged, "seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        top_logprobs=(top or 0) if logprobs else None,
        tools=tools,
        tool_choice=tool_choice,
    )
    model, task = body.get("model"), body.get("task")
    if isinstance(model, str) and not _unicode(model):  # echoed in every chunk
        raise InvalidPrompt("model must be valid Unicode")
    return ChatRequest(
        roles=roles,
        contents=contents,
        model=model if isinstance(model, str) else None,
        stream=body.get("stream") is True,
        task=task if isinstance(task, str) else None,
        timeout=_number(body, "timeout"),
        sampling=sampling,
        extras=extras if any(extras) else (),
        include_usage=bool((stream_options or {}).get("include_usage")),
    )


TURN_FIELDS = ("tool_calls", "tool_call_id")
"""A message's fields beyond role and content, for :func:`~openai_miner.messages.to_chat_messages`."""
TOOL_CHOICES = ("none", "auto", "required")


def _tools(body: Mapping[str, Any]) -> tuple[tuple[dict[str, Any], ...], str | dict[str, Any] | None]:
    """``tools`` and ``tool_choice``, as the upstream will get them; checked only for shape, the
    upstream knowing the schema, but refused here when malformed so no refusal costs a call."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not (
        isinstance(tools, list) and len(tools) <= MAX_TOOL_CALLS and all(isinstance(tool, dict) for tool in tools)
    ):
        raise InvalidPrompt(f"tools must be a list of at most {MAX_TOOL_CALLS} objects")
    if choice is not None and not (isinstance(choice, dict) or (isinstance(choice, str) and choice in TOOL_CHOICES)):
        raise InvalidPrompt(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or an object")
    if choice is not None and not tools:
        raise InvalidPrompt("tool_choice needs tools")
    return tuple(tools or ()), choice


def parse_body(body: bytes) -> ChatRequest:
    """The raw body as a :class:`ChatRequest`, or a 400 :class:`Refused` saying why not."""
    try:
        return parse_chat(json.loads(body))
    except InvalidPrompt as invalid:
        raise Refused(400, f"invalid request: {invalid}") from None
    # JSONDecodeError, UnicodeDecodeError, an int of over 4,300 digits; nesting past the
    # interpreter's depth (parsing it, or repr() of a role made of it)
    except (ValueError, RecursionError) as error:
        raise Refused(400, f"invalid request: the body is not JSON we can read ({type(error).__name__})") from None


def logprob_entry(token: Token) -> dict[str, Any]:
    """One token's ``logprobs.content`` entry, as OpenAI and vLLM write it."""

    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**one(token.text, token.logprob), "top_logprobs": [one(text, lp) for text, lp in token.top]}


FINISH = {"complete": "stop", "deadline": "length"}


def finish_reason(result: StreamResult, cut_short: Mapping[str, str] = FINISH) -> str:
    """The model's own reason when it finished (``"tool_calls"``...), else the front's word for how it ended."""
    return result.finish_reason or cut_short.get(result.outcome, "stop")


def usage(result: StreamResult) -> dict[str, int]:
    """OpenAI's ``usage``: the source's figures; without them (a source that does not count, an
    answer cut short), the text tokens sent and a prompt of 0."""
    if result.usage is None:
        return {"prompt_tokens": 0, "completion_tokens": result.tokens, "total_tokens": result.tokens}
    counted = result.usage
    return {
        "prompt_tokens": counted.prompt_tokens,
        "completion_tokens": counted.completion_tokens,
        "total_tokens": counted.total_tokens,
    }


def tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """One piece of a call as OpenAI streams it: ``id``, ``type`` and ``name`` on its first piece only."""
    entry: dict[str, Any] = {"index": piece.index}
    if piece.id is not None:
        entry.update(id=piece.id, type="function")
    entry["function"] = {"arguments": piece.arguments} if piece.name is None else {"name": piece.name, "arguments": piece.arguments}
    return entry


def tool_calls(pieces: Sequence[Piece]) -> list[dict[str, Any]]:
    """The whole calls, in OpenAI's ``message.tool_calls`` shape, assembled from their pieces (by
    ``index``; each call's arguments exactly the concatenation of its fragments)."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        if not isinstance(piece, ToolCallDelta):
            continue
        call = calls.setdefault(piece.index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
        call["id"] = call["id"] or piece.id
        call["function"]["name"] = call["function"]["name"] or piece.name
        call["function"]["arguments"] += piece.arguments
    return [calls[index] for index in sorted(calls)]


class Completion:
    """The ids and framing of one answer's chunks (``chat.completion.chunk``) or whole body.

    ``include_usage``: the stream ends with a chunk of no choices and the answer's usage, as
    OpenAI's does when ``stream_options.include_usage`` asks.
    """

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.first = True

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        event = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices, **extra}
        return b"data: " + _json(event).encode("utf-8") + b"\n\n"

    def chunk(self, delta: dict[str, Any], *, finish: str | None = None, logprobs: Any = None) -> bytes:
        if self.first:
            delta = {"role": "assistant", **delta}
            self.first = False
        return self.event([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def batch(self, batch: Sequence[Piece]) -> bytes:
        tokens = [item for item in batch if isinstance(item, Token)]
        logprobs = {"content": [logprob_entry(t) for t in tokens]} if tokens else None
        text, calls = text_of(batch), tool_calls_of(batch)
        delta: dict[str, Any] = {"content": text} if text or not calls else {}
        if calls:
            delta["tool_calls"] = [tool_call_delta(call) for call in calls]
        return self.chunk(delta, logprobs=logprobs)

    def usage_chunk(self, result: StreamResult) -> bytes:
        return self.event([], usage=usage(result))

    def whole(self, batches: Sequence[Sequence[Piece]], result: StreamResult) -> dict[str, Any]:
        pieces = [item for batch in batches for item in batch]
        tokens = [item for item in pieces if isinstance(item, Token)]
        text, calls = text_of(pieces), tool_calls(pieces)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = calls
        choice = {
            "index": 0,
            "message": message,
            "logprobs": {"content": [logprob_entry(t) for t in tokens]} if tokens else None,
            "finish_reason": finish_reason(result),
        }
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [choice],
            "usage": usage(result),
        }


class HttpFront:
    """The Starlette app of the HTTP front, on one :class:`~openai_miner.core.Core`."""

    def __init__(
        self,
        core: Core,
        auth: Authenticator,
        *,
        models: frozenset[str],
        tasks: Sequence[str] = ("InferenceTask", "MSRv2Task"),
        max_body_bytes: int = 2_000_000,
    ) -> None:
        self.core = core
        self.auth = auth
        self.models = models
        self.tasks = frozenset(task_key(task) for task in tasks)
        self.max_body_bytes = max_body_bytes
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/availability", self.availability, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    async def body(self, request: Request) -> bytes:
        """The raw body, refused (413) as soon as it is known to be over the limit."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise Refused(413, f"request body over {self.max_body_bytes} bytes")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body_bytes:
                raise Refused(413, f"request body over {self.max_body_bytes} bytes")
            parts.append(part)
        return b"".join(parts)

    async def admitted(self, request: Request) -> tuple[str, bytes]:
        """The verified caller and the body, or :class:`Refused`: signature, policy, rate limit."""
        body = await self.body(request)
        target = _target(request)
        try:
            claim = self.auth.claim(request.method, target, request.headers, body)
            denied = self.core.access.refusal(claim.hotkey)  # before the signature's cost
            if denied is not None:
                raise Refused(denied.status, denied.reason)
            hotkey = self.auth.verify(claim)
        except AuthError as error:
            raise Refused(error.status, error.reason) from None
        return hotkey, body

    async def chat(self, request: Request) -> Response:
        arrived = time.monotonic()
        try:
            hotkey, body = await self.admitted(request)
            asked = parse_body(body)
            question = self.core.question(
                hotkey, asked.roles, asked.contents, asked.task,
                timeout=_timeout(request.headers.get("x-client-timeout"), asked.timeout), arrived=arrived,
                sampling=asked.sampling,
                templated=asked.task is None or task_key(asked.task) not in UNTEMPLATED,
                extras=asked.extras,
                batch_size=1 if asked.sampling.top_logprobs is not None else None,
                front="http",
            )
        except Refused as refused:
            bt.logging.debug(f"http: refused {refused.status}: {refused.reason}")
            self.core.access.refused(request.client.host if request.client else None, refused.reason)
            return refusal(refused.status, refused.reason)
        except ClientDisconnect:
            return Response(status_code=400)
        completion = Completion(
            asked.model or next(iter(sorted(self.models)), "openai-miner"), include_usage=asked.include_usage
        )
        if asked.stream:
            return StreamingResponse(
                self.events(question, completion), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        batches: list[list[Piece]] = []

        async def collect(batch: Sequence[Piece]) -> None:
            batches.append(list(batch))

        result = await self.core.answer(question, collect)
        return JSONResponse(completion.whole(batches, result))

    async def events(self, question: Question, completion: Completion) -> AsyncIterator[bytes]:
        """The answer as SSE events: the drain's batches, a final chunk with its finish reason, [DONE].

        Starlette cancels this generator when the client hangs up, which cancels the answer and
        with it the upstream request or local generation.
        """
        out: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def emit(batch: Sequence[Piece]) -> None:
            out.put_nowait(completion.batch(batch))

        answering = asyncio.ensure_future(self.core.answer(question, emit))
        answering.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while (event := await out.get()) is not None:
                yield event
            result = answering.result()
            yield completion.chunk({}, finish=finish_reason(result))
            if completion.include_usage:
                yield completion.usage_chunk(result)
            yield b"data: [DONE]\n\n"
        finally:
            answering.cancel()

    async def availability(self, request: Request) -> Response:
        try:
            asked = json.loads(await self.body(request))
        except Refused as refused:
            return refusal(refused.status, refused.reason)
        except (ValueError, RecursionError):
            return refusal(400, "the body is not JSON")
        except ClientDisconnect:
            return Response(status_code=400)
        tasks, models = (asked.get(key) if isinstance(asked, dict) else None for key in ("task_availabilities", "llm_model_availabilities"))
        if not isinstance(tasks or {}, dict) or not isinstance(models or {}, dict):
            return refusal(400, "task_availabilities and llm_model_availabilities must be objects")
        if not all(_unicode(name) for name in (*(tasks or {}), *(models or {}))):  # echoed back
            return refusal(400, "task and model names must be valid Unicode")
        return JSONResponse({
            "task_availabilities": {task: task_key(task) in self.tasks for task in tasks or {}},
            "llm_model_availabilities": {model: model in self.models for model in models or {}},
        })

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "backend": self.core.source.describe(), "answers": self.core.stats.as_json()})


def _target(request: Request) -> str:
    """The request target as the client sent (and signed) it: raw path, then ``?query``."""
    path = (request.scope.get("raw_path") or request.scope["path"].encode()).decode("latin-1")
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


def _timeout(header: str | None, body: float | None) -> float | None:
    """The validator's timeout: ``X-Client-Timeout`` when it is a usable one, else the body's
    ``timeout``. The header is advice a proxy may add, so a bad one is ignored, not refused;
    ``float()`` takes ``inf``, ``nan`` and ``1e999``, none a deadline."""
    try:
        value = float(header) if header is not None else None
    except ValueError:
        value = None
    return value if value is not None and 0 < value <= MAX_TIMEOUT else body


class Front(base.AppFront):
    """The HTTP front as the miner serves it (``--http.port``): :class:`HttpFront` on the miner's core,
    verifying signatures made for the miner's hotkey."""

    name = "http"
    label = "HTTP front"
    add_args = staticmethod(add_args)

    @classmethod
    def advertise_asked(cls, config: bt.Config) -> bool:
        return config.http.advertise

    def app(self) -> Starlette:
        core = self.core
        return HttpFront(
            core,
            Authenticator(self.miner.wallet.hotkey.ss58_address),
            models=core.source.models(),
            tasks=self.miner.config.http.tasks,
            max_body_bytes=self.miner.config.neuron.max_body_bytes,
        ).app
