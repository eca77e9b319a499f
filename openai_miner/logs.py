"""The run's log, fit for a terminal and for a file alike.

bittensor writes every record from one thread (a ``QueueListener``) through one handler, a
``StreamHandler`` on stdout with colour codes in every line. This module keeps that one stream
(stdout: the run's log, its summary line and its stop line all go there; only a failure to
start goes to stderr) and makes it fit for files: no colour codes where the stream is not a
terminal or ``NO_COLOR`` is set, none of bittensor's ``Info enabled.`` lines, and :func:`say`
for the lines the command prints itself (the summary, the stop), written under the handler's
lock so that they never merge with a line the serving thread logs at the same moment.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping, TextIO

import bittensor as bt
from bittensor.utils.btlogging.format import BtStreamFormatter

ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""An ANSI escape sequence (colour, brightness, reset): what colorama's constants are."""

LEVEL_CHANGES = frozenset(
    f"{what}{suffix}"
    for what in ("Warning", "Info", "Trace", "Debug", "Logging")
    for suffix in (" enabled.", " disabled.")
) | {
    "Enabling default logging (Warning level)", "Enabling warning.", "Enabling info logging.",
    "Enabling trace.", "Disabling trace.", "Enabling debug.", "Disabling debug.", "Disabling logging.",
}
"""What bittensor logs on each change of level: noise to an operator, who chose the level."""


class OwnLines(logging.Filter):
    """bittensor's debug format labels every line ``bittensor:<file>``, the miner's own lines too
    (``bittensor:miner.py``): lines logged from this package are labelled ``openai_miner`` instead.
    bittensor's own notes on a change of level (:data:`LEVEL_CHANGES`) are dropped."""

    PACKAGE = str(Path(__file__).resolve().parent)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(self.PACKAGE):
            record.name = "openai_miner"
        return not (isinstance(record.msg, str) and record.msg in LEVEL_CHANGES)


class PlainFormatter(BtStreamFormatter):
    """bittensor's stream format (the same fields, the same trace layout) without colour codes."""

    def format(self, record: logging.LogRecord) -> str:
        return ESCAPE.sub("", super().format(record))


def wants_colour(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and only where ``NO_COLOR`` is unset or empty (no-color.org)."""
    env = os.environ if env is None else env
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def stream_handler() -> logging.StreamHandler:
    """bittensor's console handler: the one every record of the run is written through."""
    handlers = bt.logging._handlers  # no public accessor; set up once, on import
    return next(
        handler for handler in handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    )


def setup() -> None:
    """Label and filter the miner's lines, and drop colour where it is not wanted; idempotent."""
    logger = logging.getLogger("bittensor")
    if not any(isinstance(existing, OwnLines) for existing in logger.filters):
        logger.addFilter(OwnLines())
    handler = stream_handler()
    if wants_colour(handler.stream) or isinstance(handler.formatter, PlainFormatter):
        return
    plain = PlainFormatter()
    plain.set_trace(bt.logging._stream_formatter.trace)
    bt.logging._stream_formatter = plain  # bittensor switches its trace layout on this attribute
    handler.setFormatter(plain)


def say(line: str) -> None:
    """Write ``line`` to the log stream as it is (no time, no level), whole, between two records."""
    handler = stream_handler()
    with handler.lock:
        handler.stream.write(line + "\n")
        handler.stream.flush()
