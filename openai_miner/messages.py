"""The package's own chat messages, made from a request's roles/messages, refusing what no model should be sent.

Validation lives here, before any model work, so a malformed synapse costs nothing and gets a
reason the validator can read. A tool conversation's turns (an assistant's ``tool_calls``, a
``tool`` message's ``tool_call_id``) come as each message's ``extras``, OpenAI's names and shapes.
A :class:`Message` is plain data: each source turns it into what its model takes (the OpenAI
source into LangChain's classes, the local one into a chat template's dicts), so the core and the
fronts depend on no model library.
"""

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

Role = Literal["system", "user", "assistant", "tool"]
ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
"""A request's role names, each the :data:`Role` it is."""


@dataclass(frozen=True)
class ToolCall:
    """An assistant's call of a tool, as the conversation brought it: ``arguments`` is the JSON
    text the model wrote, kept whole whether or not it parses."""

    id: str
    name: str
    arguments: str

    def parsed(self) -> dict[str, Any] | None:
        """The arguments as the JSON object they should be; ``None`` if they are not one (the
        model wrote them: the conversation is still answerable)."""
        try:
            value = json.loads(self.arguments)
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``tool_calls`` only on an assistant's, ``tool_call_id`` (the call
    it answers) only on a tool's."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


MAX_TOOL_CALLS = 128
"""Calls in one assistant message, and tools in one request (OpenAI's limit on tools)."""
MAX_ID = 256
"""Characters of a tool call's id (OpenAI's are about 30)."""


SPACES = " \t\r\n"  # what may surround a role; str.strip() would also take \x1c-\x1f, \x85, \u2028...


class InvalidPrompt(ValueError):
    """The synapse cannot be answered; ``str(error)`` is the reason sent to the validator."""


MAX_TIMEOUT = 3600.0
"""Seconds; validators ask for tens."""


def checked_timeout(timeout: float | None) -> float | None:
    """A validator's timeout, refused unless a deadline can come of it (JSON carries ``1e400``
    and ``NaN``); one of 0 or less means the default."""
    if timeout is not None and (not math.isfinite(timeout) or timeout > MAX_TIMEOUT):
        raise InvalidPrompt(f"timeout must be a finite number of seconds up to {MAX_TIMEOUT:g}")
    return timeout


def shown(value: object, limit: int = 40) -> str:
    """``value`` quoted for a reason: it travels in a response header, so short and ASCII only.

    A long or non-Latin-1 role echoed whole made the header too big (or unencodable) for the
    validator's HTTP client, which then saw a client error instead of the reason.
    """
    text = value if isinstance(value, str) else repr(value)
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def _tool_calls(value: Any, index: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked to be OpenAI's shape; kept as they came."""
    where = f"message {index} tool_calls"
    if not isinstance(value, list) or not 0 < len(value) <= MAX_TOOL_CALLS:
        raise InvalidPrompt(f"{where} must be a list of 1 to {MAX_TOOL_CALLS} calls")
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and _id(call.get("id"))
            and call.get("type", "function") == "function"
            and isinstance(function.get("name"), str)
            and function["name"]
            and isinstance(function.get("arguments"), str)
        ):
            raise InvalidPrompt(f'{where}: each must be {{"id", "type": "function", "function": {{"name", "arguments": string}}}}')
    return value


def _id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID


def _message(role: Role, content: str, extras: Mapping[str, Any], index: int) -> Message:
    """One chat message; a tool call or a tool's result may have no text, nothing else may."""
    calls = extras.get("tool_calls")
    if calls is not None and role != "assistant":
        raise InvalidPrompt(f"message {index} ({role}) cannot carry tool_calls: only an assistant's can")
    if role == "tool":
        tool_call_id = extras.get("tool_call_id")
        if not _id(tool_call_id):
            raise InvalidPrompt(f"message {index} (tool) needs a tool_call_id of 1 to {MAX_ID} characters")
        return Message(role, content, tool_call_id=tool_call_id)
    if calls is not None:
        return Message(
            role, content,
            tool_calls=tuple(
                ToolCall(call["id"], call["function"]["name"], call["function"]["arguments"])
                for call in _tool_calls(calls, index)
            ),
        )
    if not content.strip():
        raise InvalidPrompt(f"message {index} ({role}) is empty")
    return Message(role, content)


def to_chat_messages(
    roles: Sequence[str],
    messages: Sequence[str],
    *,
    system_prompt: str | None = None,
    max_chars: int = 100_000,
    max_messages: int = 1024,
    extras: Sequence[Mapping[str, Any]] = (),
) -> list[Message]:
    """Map each (role, message) pair to a chat message, in order, keeping the whole history.

    ``extras`` (none, or one mapping per message) brings a tool conversation's fields:
    ``tool_calls`` of an assistant, ``tool_call_id`` of a tool's result.
    ``system_prompt`` is put first unless the conversation brings its own system message.
    Raises :class:`InvalidPrompt` for anything that would make the answer meaningless.
    """
    if not messages:
        raise InvalidPrompt("no messages: the synapse must carry at least one message")
    if len(messages) > max_messages:  # first: turning each into a request costs time on the event loop
        raise InvalidPrompt(f"{len(messages)} messages is over this miner's limit of {max_messages}")
    if len(roles) != len(messages):
        raise InvalidPrompt(
            f"{len(roles)} roles for {len(messages)} messages: each message needs exactly one role"
        )
    if extras and len(extras) != len(messages):
        raise InvalidPrompt(f"{len(extras)} extras for {len(messages)} messages")
    total = sum(len(message) for message in messages)
    if total > max_chars:
        raise InvalidPrompt(f"prompt of {total} characters is over this miner's limit of {max_chars}")
    chat: list[Message] = []
    for index, (role, content) in enumerate(zip(roles, messages)):
        known = ROLES.get(role.strip(SPACES).lower()) if isinstance(role, str) else None
        if known is None:
            raise InvalidPrompt(
                f"message {index} has unknown role {shown(role)}; expected one of {', '.join(ROLES)}"
            )
        message = _message(known, content, extras[index] if extras else {}, index)
        total += sum(len(call.arguments) for call in message.tool_calls)
        if total > max_chars:
            raise InvalidPrompt(f"prompt of over {max_chars} characters with its tool calls' arguments")
        chat.append(message)
    if not any(message.role == "user" for message in chat):
        raise InvalidPrompt("no user message: there is nothing to answer")
    if system_prompt and not any(message.role == "system" for message in chat):
        chat.insert(0, Message("system", system_prompt))
    return chat
