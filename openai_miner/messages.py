"""Synapse roles/messages -> LangChain chat messages, refusing what no model should be sent.

Validation lives here, before any model work, so a malformed synapse costs nothing and gets a
reason the validator can read.
"""

import math
from typing import Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

ROLES: dict[str, type[BaseMessage]] = {
    "system": SystemMessage,
    "user": HumanMessage,
    "assistant": AIMessage,
}


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


def to_chat_messages(
    roles: Sequence[str],
    messages: Sequence[str],
    *,
    system_prompt: str | None = None,
    max_chars: int = 100_000,
    max_messages: int = 1024,
) -> list[BaseMessage]:
    """Map each (role, message) pair to a chat message, in order, keeping the whole history.

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
    total = sum(len(message) for message in messages)
    if total > max_chars:
        raise InvalidPrompt(f"prompt of {total} characters is over this miner's limit of {max_chars}")
    chat: list[BaseMessage] = []
    for index, (role, content) in enumerate(zip(roles, messages)):
        kind = ROLES.get(role.strip(SPACES).lower()) if isinstance(role, str) else None
        if kind is None:
            raise InvalidPrompt(
                f"message {index} has unknown role {shown(role)}; expected one of {', '.join(ROLES)}"
            )
        if not content.strip():
            raise InvalidPrompt(f"message {index} ({role.strip(SPACES).lower()}) is empty")
        chat.append(kind(content=content))
    if not any(isinstance(message, HumanMessage) for message in chat):
        raise InvalidPrompt("no user message: there is nothing to answer")
    if system_prompt and not any(isinstance(message, SystemMessage) for message in chat):
        chat.insert(0, SystemMessage(content=system_prompt))
    return chat
