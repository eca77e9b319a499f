"""`StreamPromptingSynapse`: the wire contract with subnet 1 ("prompting") validators.

The class name is the axon route, and the fields are SN1's, so SN1 validators talk to this miner
unchanged. Newer validators send ``task_name`` (which chooses the system prompt, see
:mod:`openai_miner.system_prompts`), ``target_model`` and ``seed``; all are accepted.
"""

import asyncio
import codecs
import functools
import json
from typing import AsyncIterator, ClassVar, List, Optional

import bittensor as bt
import pydantic
from aiohttp import ClientResponse
from starlette.types import Receive, Scope, Send


class DisconnectAwareResponse(bt.StreamingSynapse.BTStreamingResponse):
    """Bittensor's streaming response, stopped as soon as the validator hangs up.

    The axon never says when a client leaves (uvicorn silently drops later sends), so a miner
    would keep paying for tokens nobody reads. This listens for ASGI's ``http.disconnect`` beside
    the stream and cancels the token streamer on it, which cancels the upstream request.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stream.cancel()
            watch.cancel()
        if stream.done() and not stream.cancelled():
            stream.result()  # re-raise what the streamer raised
        else:
            bt.logging.debug("validator disconnected: stream cancelled")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class StreamPromptingSynapse(bt.StreamingSynapse):
    """A chat conversation in (``roles``/``messages``), a streamed ``completion`` out."""

    roles: List[str] = pydantic.Field(
        ...,
        title="Roles",
        description="Role of each message: system, user or assistant.",
        frozen=True,
    )
    messages: List[str] = pydantic.Field(
        ..., title="Messages", description="The conversation, one string per role.", frozen=True
    )
    required_hash_fields: ClassVar[tuple[str, ...]] = ("messages",)
    completion: str = pydantic.Field("", title="Completion", description="The miner's answer.")
    task_name: Optional[str] = pydantic.Field(None, title="Task name")
    target_model: Optional[str] = pydantic.Field(None, title="Target model")
    seed: Optional[int] = pydantic.Field(None, title="Seed")
    _error_body: Optional[str] = pydantic.PrivateAttr(None)

    BTStreamingResponse: ClassVar[type] = DisconnectAwareResponse

    async def process_streaming_response(
        self, response: ClientResponse
    ) -> AsyncIterator[str]:
        """Yield each decoded chunk and append it to ``completion``.

        Newlines are kept and a multi-byte character split across chunks is decoded once whole.
        A non-200 body (blacklisted, bad signature, refused input) is an error message, never
        a completion: it is kept for ``extract_response_json`` and nothing is yielded.
        """
        if self.completion is None:
            self.completion = ""
        if response.status != 200:
            self._error_body = (await response.read()).decode("utf-8", errors="replace")
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in response.content.iter_any():
            text = decoder.decode(chunk)
            if text:
                self.completion += text
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            self.completion += tail
            yield tail

    def extract_response_json(self, response: ClientResponse) -> dict:
        """Headers and fields of the answer, in the shape bittensor's dendrite merges back."""
        headers = {
            k.decode("utf-8"): v.decode("utf-8") for k, v in response.raw_headers
        }

        def terminal(prefix: str) -> dict[str, str]:
            return {
                key.split("_")[-1]: value
                for key, value in headers.items()
                if key.startswith(prefix)
            }

        result = {
            "name": headers.get("name", ""),
            "timeout": float(headers.get("timeout", 0)),
            "total_size": int(headers.get("total_size", 0)),
            "header_size": int(headers.get("header_size", 0)),
            "dendrite": terminal("bt_header_dendrite"),
            "axon": terminal("bt_header_axon"),
            "roles": self.roles,
            "messages": self.messages,
            "completion": self.completion,
        }
        if self._error_body is not None:
            result["message"] = _error_message(self._error_body)
        return result

    def deserialize(self) -> str:
        return self.completion

    def get_required_fields(self) -> list[str]:
        """Bittensor rebuilds the JSON schema for this on every ``to_headers()`` (~3 ms of CPU)."""
        return list(_required_fields(type(self)))


OTHER_STRINGS = 256
"""Strings a synapse's body may hold besides its roles and messages: a dendrite's holds 44 (keys
included), room left for fields to come."""


def strings_at_least(body: bytes) -> int:
    """A lower bound on the strings (keys included) in a JSON ``body``, from two byte counts at
    C speed instead of a parse: never more than there are, and at least half (rounded down)
    whatever the sender does, pretty-printing included.

    Each string has two unescaped quotes; every escaped one is preceded by a backslash, so all
    quotes less the backslash-quote pairs is at most the unescaped ones. It is one short where a
    string's content ends in a backslash (``"a\\\\"``): at most once a string.
    """
    return (body.count(b'"') - body.count(b'\\"')) // 2


@functools.cache
def _required_fields(cls: type[pydantic.BaseModel]) -> tuple[str, ...]:
    return tuple(cls.model_json_schema().get("required", []))


def _error_message(body: str) -> str:
    """The axon's error bodies are ``{"message": ...}``, FastAPI's ``{"detail": ...}``; else the text."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if isinstance(parsed, dict):
        for key in ("message", "detail"):
            if key in parsed:
                return str(parsed[key])
    return body
