"""A daily limit on the tokens the upstream may spend, kept across restarts.

A proxy miner pays per token, and every registered validator may ask it: without a bound, one
busy day is one surprising bill. :class:`DailyBudget` counts the upstream's prompt and completion
tokens per UTC day (as its ``usage`` reports them; estimated when it reports none). Once the day's
budget is spent the upstream is not called again before the next UTC day: the local model answers,
or, without one, requests are refused (503) before any work. The running total lives in a small
JSON file, replaced atomically at each change, so that a restart (or a crash) keeps it; a file that
cannot be read is reported and the day starts afresh, never a crash.

A request admitted just before the budget ran out still completes: the day may go over its budget
by the answers in flight at that moment, at most ``--openai.max_tokens`` each plus their prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import bittensor as bt

STATE_FILE = "spend.json"


def utc_today() -> date:
    return datetime.now(UTC).date()


class DailyBudget:
    """``limit`` tokens a UTC day, the day's total kept in ``path`` (``None``: in memory only).

    ``today`` gives the current UTC date (tests pass their own calendar).
    """

    def __init__(self, limit: int, path: Path | None = None, today: Callable[[], date] = utc_today) -> None:
        if limit < 1:
            raise ValueError(f"a daily token budget must be at least 1 token, not {limit}")
        self.limit = limit
        self.path = path
        self._today = today
        self.day = today()
        self.spent = 0
        self._tripped = False
        self._unwritable = False
        if path is not None:
            self._load(path)

    def reading(self) -> tuple[int, int]:
        """Today's spend and the limit, as the metrics report them (a new day reads 0)."""
        self._roll()
        return self.spent, self.limit

    def exhausted(self) -> bool:
        """Whether today's budget is spent (the upstream must not be called); warns once when it is."""
        self._roll()
        if self.spent < self.limit:
            return False
        if not self._tripped:
            self._tripped = True
            bt.logging.warning(
                f"the upstream's daily token budget is spent ({self.spent:,} of {self.limit:,} tokens today): "
                "it is not called again before 00:00 UTC (--openai.daily_token_budget)"
            )
        return True

    def charge(self, tokens: int) -> None:
        """Count ``tokens`` the upstream spent on one answer."""
        if tokens <= 0:
            return
        self._roll()
        self.spent += tokens
        self._save()
        self.exhausted()

    def _roll(self) -> None:
        today = self._today()
        if today == self.day:
            return
        if self._tripped:
            bt.logging.warning(
                f"a new UTC day ({today.isoformat()}): the upstream's daily token budget of {self.limit:,} "
                "tokens is available again"
            )
        self.day, self.spent, self._tripped = today, 0, False
        self._save()

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as error:
            bt.logging.warning(f"cannot read the spend file {path} ({error}): counting today from 0")
            return
        try:
            state = json.loads(text)
            day, spent = date.fromisoformat(state["day"]), state["spent"]
            if not isinstance(spent, int) or isinstance(spent, bool) or spent < 0:
                raise ValueError(f"spent is {str(spent)[:20]!r}")
        except (ValueError, TypeError, KeyError) as error:
            bt.logging.warning(
                f"the spend file {path} is corrupt ({type(error).__name__}: {str(error)[:80]}): "
                "counting today from 0"
            )
            return
        if day == self.day:
            self.spent = spent
        bt.logging.info(
            f"upstream spend today: {self.spent:,} of {self.limit:,} tokens (--openai.daily_token_budget, {path})"
        )

    def _save(self) -> None:
        """Write the state to a temporary file beside ``path``, then rename it over ``path``: a reader
        (or a restart after a crash) sees the old state or the new one, never half of one."""
        if self.path is None:
            return
        state = json.dumps({"day": self.day.isoformat(), "spent": self.spent, "limit": self.limit})
        temporary: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(state)
            os.replace(temporary, self.path)
        except OSError as error:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            if not self._unwritable:  # keep counting in memory: a full disk must not stop the answers
                self._unwritable = True
                bt.logging.warning(
                    f"cannot write the spend file {self.path} ({error.strerror}): today's total will not "
                    "survive a restart"
                )
            return
        self._unwritable = False
