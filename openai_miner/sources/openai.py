"""Tokens from any OpenAI-compatible chat model, through LangChain's ``ChatOpenAI``.

The model streams; each chunk of its stream goes on the drain's queue as it arrives
(:class:`QueueWriter`). Transient upstream errors (429, 5xx, timeouts, refused connections) are retried by
``tenacity``, but only before the first token (a retry after it would repeat text) and only while
the next attempt can still start before the request's deadline; ``Retry-After`` is honoured. A
refused prompt (400, 413, 422) or an empty answer is a :class:`NoAnswer`, not an outage. A
request's own sampling settings, ``logprobs``, ``tools`` and ``tool_choice`` go to the upstream as
the OpenAI API names them; the model's tool calls come back as
:class:`~openai_miner.sources.base.ToolCallDelta` pieces, and its finish reason and usage (asked for
on every stream) as the answer's :class:`~openai_miner.sources.base.Finish`.

A streamed answer's events reach LangChain as the dicts their JSON is (:class:`RawChunks`): the
SDK would build a pydantic ``ChatCompletionChunk`` for each, which LangChain turns straight back
into a dict, about half of the CPU the path spent per token.
"""

import asyncio
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Any, Self

import bittensor as bt
import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.outputs import ChatGenerationChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr, model_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from openai_miner.budget import DailyBudget
from openai_miner.messages import Message
from openai_miner.sources.base import (
    DEFAULT_SAMPLING,
    Closed,
    Finish,
    Item,
    NoAnswer,
    Sampling,
    Token,
    ToolCallDelta,
    UpstreamError,
    Usage,
)

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
REFUSED_STATUS = frozenset({400, 413, 422})  # the prompt's fault (over the context...), not the server's


class QueueWriter:
    """Puts what each streamed chunk carries on the drain's queue, as the chunk arrives.

    A chunk's non-empty text goes on as a ``str`` (role, finish and usage chunks have none), or,
    with ``logprobs``, each token of its ``logprobs.content`` (in its ``generation_info``) as a
    :class:`Token`; its tool-call pieces as :class:`ToolCallDelta` items (arguments as the
    upstream sent them); its finish reason and usage are kept for :meth:`finish`.

    It reads the chunks of the model's own stream (``_astream``, what a LangChain chat model
    implements to stream), not LangChain's callbacks under ``astream`` or ``ainvoke``: those keep
    every chunk of the answer to merge them into one message at its end, which nobody here
    reads, and the collector then scans them all, again and again, while the answers stream (a
    third of the CPU per token at 128 streams of 600 tokens; the callback dispatch itself
    another sixth).
    """

    def __init__(self, queue: "asyncio.Queue[Item]", logprobs: bool = False) -> None:
        self.queue = queue
        self.logprobs = logprobs
        self.tokens = 0
        self.calls = 0  # tool-call pieces
        self.reason: str | None = None
        self.usage: Usage | None = None

    @property
    def answered(self) -> bool:
        """Whether anything of the answer went out (a retry would then repeat it)."""
        return self.tokens > 0 or self.calls > 0

    def finish(self) -> Finish:
        return Finish(self.reason, self.usage)

    def write(self, chunk: ChatGenerationChunk) -> None:
        message, info = chunk.message, chunk.generation_info or {}
        for piece in getattr(message, "tool_call_chunks", None) or ():
            self.calls += 1
            self.queue.put_nowait(
                ToolCallDelta(piece.get("index") or 0, piece.get("id"), piece.get("name"), piece.get("args") or "")
            )
        reason = info.get("finish_reason")
        if isinstance(reason, str):
            self.reason = reason
        counted = getattr(message, "usage_metadata", None)
        if counted:
            self.usage = Usage(int(counted.get("input_tokens") or 0), int(counted.get("output_tokens") or 0))
        text = message.content
        if not isinstance(text, str) or not text:
            return
        content = (info.get("logprobs") or {}).get("content") if self.logprobs else None
        if not content:
            self.tokens += 1
            self.queue.put_nowait(text)
            return
        for entry in content:
            self.tokens += 1
            self.queue.put_nowait(
                Token(
                    text=entry["token"],
                    logprob=float(entry["logprob"]),
                    top=tuple((alt["token"], float(alt["logprob"])) for alt in entry.get("top_logprobs") or ()),
                )
            )


def request_options(sampling: Sampling) -> dict[str, Any]:
    """The OpenAI API parameters of a request's own settings (``top_k`` as vLLM takes it)."""
    options: dict[str, Any] = {
        name: value
        for name, value in (
            ("temperature", sampling.temperature),
            ("top_p", sampling.top_p),
            ("max_tokens", sampling.max_tokens),
            ("seed", sampling.seed),
        )
        if value is not None
    }
    if sampling.stop:
        options["stop"] = list(sampling.stop)
    if sampling.top_k is not None:
        options["extra_body"] = {"top_k": sampling.top_k}
    if sampling.top_logprobs is not None:
        options.update(logprobs=True, top_logprobs=sampling.top_logprobs)
    if sampling.tools:
        options["tools"] = list(sampling.tools)
    if sampling.tool_choice is not None:
        options["tool_choice"] = sampling.tool_choice
    return options


class RawChunks:
    """The SDK's ``chat.completions``, except that a stream yields each event's JSON as a dict.

    The request is the SDK's own (client, auth, base URL, timeout, headers, status errors), made
    through ``with_raw_response`` so that nothing is parsed yet; its events are then read as
    ``AsyncStream(cast_to=object)``, which yields each as the SDK parsed it, with everything else
    of the SDK's stream kept: ``[DONE]``, error events, the connection drained for reuse, the
    response closed on exit. ``langchain_openai`` converts a dict chunk as it is (a model, it
    first ``model_dump()``s). Anything else (non-streamed answers, ``with_raw_response`` itself)
    is the SDK's, untouched.
    """

    def __init__(self, completions: Any, client: openai.AsyncOpenAI) -> None:
        self._completions = completions
        self._client = client

    async def create(self, **payload: Any) -> Any:
        if not payload.get("stream"):
            return await self._completions.create(**payload)
        raw = await self._completions.with_raw_response.create(**payload)
        return openai.AsyncStream(cast_to=object, response=raw.http_response, client=self._client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)


class StreamedChatOpenAI(ChatOpenAI):
    """``ChatOpenAI`` whose streams skip the SDK's per-chunk objects (:class:`RawChunks`).

    It relies on ``langchain_openai``'s ``_astream`` calling ``async_client.create`` and taking
    dict chunks: ``tests/test_fast_path.py`` fails loudly if a release changes that, and
    ``setup.cfg`` pins the range it was tested on.
    """

    @model_validator(mode="after")
    def _raw_chunks(self) -> Self:
        if self.async_client is not None and not isinstance(self.async_client, RawChunks):
            self.async_client = RawChunks(self.async_client, self.root_async_client)
        return self


def chat_openai(
    *,
    model: str,
    api_key: SecretStr | str | None,
    base_url: str | None = None,
    temperature: float = 0.7,
    max_tokens: int | None = None,
    timeout: float | None = None,
) -> StreamedChatOpenAI:
    """A streaming :class:`StreamedChatOpenAI` with its own HTTP client, so it is bound to no other event loop.

    The SDK's own retries are off: :class:`OpenAISource` retries, knowing the deadline. So is
    LangChain's per-chunk timer (120 s by default): every answer has a deadline far shorter, and
    the timer wraps each chunk in ``asyncio.wait_for``, a task per chunk, about 15% of the CPU the
    path spends per token (measured on a 1,000-token answer). Every stream asks for its usage
    (``stream_options.include_usage``): the fronts report the upstream's own count.
    """
    return StreamedChatOpenAI(
        model=model,
        api_key=api_key if isinstance(api_key, SecretStr) else SecretStr(api_key or "EMPTY"),
        base_url=base_url,
        temperature=temperature,
        max_tokens=max_tokens,
        timeout=timeout,
        max_retries=0,
        streaming=True,
        stream_usage=True,
        stream_chunk_timeout=None,
        http_async_client=openai.DefaultAsyncHttpxClient(),
    )


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code in RETRYABLE_STATUS


def retry_after(error: BaseException | None) -> float | None:
    """Seconds the server asked us to wait, from a ``Retry-After`` header in seconds."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def describe(error: BaseException) -> str:
    """A log-safe line: the status and the server's message, never the request or the key."""
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code} {type(error).__name__}: {error.message}"
    return f"{type(error).__name__}: {error}"


def error_kind(error: BaseException) -> str:
    """A failed attempt's kind, as the metrics count it: the HTTP status (``"429"``, ``"500"``...),
    ``"timeout"``, ``"connection"``, or ``"malformed"`` (a chunk that could not be read); the fallback
    adds ``"stalled"`` (no first token in its share of the deadline, then cancelled)."""
    if isinstance(error, openai.APIStatusError):
        return str(error.status_code)
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    return "malformed"


def spent(writer: QueueWriter, messages: Sequence[Message]) -> int:
    """Tokens an answer cost: the upstream's usage; without it (a stream cut, a server that does not
    count), about four characters a prompt token and a token a chunk, or nothing if nothing came."""
    if writer.usage is not None:
        return writer.usage.total_tokens
    if not writer.answered:
        return 0
    return sum(len(message.content) for message in messages) // 4 + writer.tokens + writer.calls


def upstream_error(error: Exception) -> UpstreamError:
    """What a failed answer tells the core: the prompt refused (:class:`NoAnswer`), or the upstream failing."""
    if isinstance(error, openai.APIStatusError):
        kind = NoAnswer if error.status_code in REFUSED_STATUS else UpstreamError
        return kind(describe(error))
    if isinstance(error, openai.OpenAIError):
        return UpstreamError(describe(error))
    # A chunk the SDK or LangChain could not parse (bad JSON, bytes, shape): one log line.
    reason = str(error).splitlines()[0][:200] if str(error) else ""
    return UpstreamError(f"malformed upstream response: {type(error).__name__}: {reason}")


def release(error: BaseException) -> None:
    """Drop the locals of the frames ``error`` and its causes came through.

    On a chunk it cannot parse, the SDK stops reading its response stream where it is: a chain of
    suspended async generators (SSE decoding, httpx, httpcore), held by those frames, which the
    error's traceback holds. Kept there, they wait for the garbage collector, which would close
    them at its next pass from whatever thread runs it (the local model's, mid-forward). Dropped
    now, they are closed at once on this loop.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        traceback.clear_frames(cause.__traceback__)
        cause = cause.__cause__ or cause.__context__


def langchain_messages(messages: Sequence[Message]) -> list[BaseMessage]:
    """The conversation as LangChain's classes, the one place they meet the package's own
    :class:`~openai_miner.messages.Message`. A tool call whose arguments are no JSON object goes
    on as an invalid call, its arguments as the model wrote them."""
    chat: list[BaseMessage] = []
    for message in messages:
        if message.role == "system":
            chat.append(SystemMessage(content=message.content))
        elif message.role == "user":
            chat.append(HumanMessage(content=message.content))
        elif message.role == "tool":
            chat.append(ToolMessage(content=message.content, tool_call_id=message.tool_call_id or ""))
        else:
            parsed = [(call, call.parsed()) for call in message.tool_calls]
            chat.append(AIMessage(
                content=message.content,
                tool_calls=[tool_call(name=call.name, args=args, id=call.id) for call, args in parsed if args is not None],
                invalid_tool_calls=[
                    invalid_tool_call(name=call.name, args=call.arguments, id=call.id) for call, args in parsed if args is None
                ],
            ))
    return chat


class OpenAISource:
    """A :class:`~openai_miner.sources.base.TokenSource` over a LangChain chat model."""

    name = "openai"

    @classmethod
    def from_config(
        cls, config: Any, api_key: SecretStr | None, budget: DailyBudget | None = None
    ) -> "OpenAISource":
        settings = config.openai
        model = chat_openai(
            model=settings.model_name,
            api_key=api_key,
            base_url=settings.base_url,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            timeout=settings.timeout,
        )
        return cls(model, max_retries=settings.max_retries, backoff=settings.retry_backoff, budget=budget)

    def __init__(
        self,
        model: BaseChatModel,
        *,
        max_retries: int = 2,
        backoff: float = 0.25,
        max_backoff: float = 4.0,
        budget: DailyBudget | None = None,
    ) -> None:
        self.model = model
        self.max_retries = max_retries
        self.max_tokens: int | None = getattr(model, "max_tokens", None)  # the most one answer may cost
        self.budget = budget
        self.errors: Counter[str] = Counter()  # failed attempts by kind (error_kind), for the metrics
        self._backoff = wait_exponential_jitter(initial=backoff, max=max_backoff, jitter=backoff)

    def describe(self) -> str:
        base_url = getattr(self.model, "openai_api_base", None)
        return f"openai ({self.model_name} at {base_url or 'api.openai.com'})"

    @property
    def model_name(self) -> str:
        return getattr(self.model, "model_name", None) or type(self.model).__name__

    def models(self) -> frozenset[str]:
        return frozenset({self.model_name})

    def closed(self) -> str | None:
        """Why the upstream may not be called now: its daily token budget is spent."""
        if self.budget is not None and self.budget.exhausted():
            return f"the upstream's daily token budget ({self.budget.limit:,} tokens) is spent until 00:00 UTC"
        return None

    async def produce(
        self,
        messages: Sequence[Message],
        queue: "asyncio.Queue[Item]",
        deadline: float,
        sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        shut = self.closed()
        if shut is not None:
            raise Closed(shut)
        chat = langchain_messages(messages)
        writer = QueueWriter(queue, logprobs=sampling.top_logprobs is not None)
        options = request_options(sampling)
        if self.max_tokens is not None and sampling.max_tokens is not None and sampling.max_tokens > self.max_tokens:
            options["max_tokens"] = self.max_tokens  # a caller may ask for less than the miner pays for, never more

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return max(retry_after(error) or 0.0, self._backoff(state))

        def past_deadline(state: RetryCallState) -> bool:
            return time.monotonic() + state.upcoming_sleep >= deadline

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            bt.logging.warning(
                f"upstream attempt {state.attempt_number} failed ({describe(error) if error else '?'}); "
                f"retrying in {state.upcoming_sleep:.2f}s"
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda error: not writer.answered and is_transient(error)),
            stop=stop_after_attempt(self.max_retries + 1) | past_deadline,
            wait=wait,
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        async for chunk in self.model._astream(chat, **options):
                            writer.write(chunk)
                    except Exception as error:
                        self.errors[error_kind(error)] += 1
                        raise
        except (openai.OpenAIError, ValueError, TypeError, AttributeError, KeyError) as error:
            release(error)
            raise upstream_error(error) from error
        finally:
            if self.budget is not None:
                self.budget.charge(spent(writer, messages))
        if not writer.answered:
            raise NoAnswer("the upstream answered with no text")
        queue.put_nowait(writer.finish())
