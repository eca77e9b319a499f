"""The answers of the last minute or so, as one summary line.

A busy miner turns its per-answer lines off (``--no-neuron.log_answers``) but still wants to see,
at the default level, how it is doing: answers by outcome and by source, the share the local
fallback answered, tokens per second, time to first chunk, and the requests refused in the window
by reason (the difference of the access policy's running totals). Like the refusal summary
(:class:`~openai_miner.access.Refusals`), the line is written when an answer is counted and the
window is at least ``every`` seconds old, so a silent miner writes nothing and no timer thread
is needed; the line says how many seconds it covers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Mapping, Sequence

import bittensor as bt

from openai_miner.streaming import StreamResult


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty), ``share`` in [0, 1]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


class Tally:
    """Answers counted since the last summary line; fronts answer from several threads, hence the lock."""

    def __init__(
        self,
        every: float = 60.0,
        fallback: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        refusals: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.every = every
        self.fallback = fallback  # the source that answers when the upstream fails; None: no fallback
        self._refusals = refusals  # every refusal since the start, by kind (Refusals.totals)
        self._refused_before: Counter[str] = Counter(dict(refusals()))
        self._clock = clock
        self._lock = threading.Lock()
        self._since = clock()
        self._outcomes: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._tokens = 0
        self._busy = 0.0  # seconds spent answering, summed over the answers
        self._first_chunks: list[float] = []

    def count(self, result: StreamResult, duration: float) -> None:
        """Count one answer that took ``duration`` seconds; log the summary when the window is over."""
        with self._lock:
            self._outcomes[result.outcome] += 1
            self._sources[result.source] += 1
            self._tokens += result.tokens
            self._busy += duration
            if result.first_chunk is not None:
                self._first_chunks.append(result.first_chunk)
            now = self._clock()
            if now - self._since < self.every:
                return
            line = self._line(now - self._since)
            self._reset(now)
        bt.logging.info(line)

    def _line(self, seconds: float) -> str:
        total = sum(self._outcomes.values())
        outcomes = ", ".join(f"{outcome} {count}" for outcome, count in self._outcomes.most_common())
        sources = ", ".join(f"{source} {count}" for source, count in self._sources.most_common())
        if self.fallback is not None:
            sources += f" (fallback {self._sources[self.fallback] / total:.0%})"
        rate = self._tokens / self._busy if self._busy > 0 else 0.0
        line = (
            f"answered {total} in {seconds:.0f}s: {outcomes} | {sources} | "
            f"{self._tokens} tokens, {rate:.0f} tokens/s an answer"
        )
        if self._first_chunks:
            p50, p95 = percentile(self._first_chunks, 0.5), percentile(self._first_chunks, 0.95)
            line += f" | first chunk p50 {p50:.2f}s p95 {p95:.2f}s"
        refused = Counter(dict(self._refusals())) - self._refused_before
        if refused:
            reasons = ", ".join(f"{reason} {count}" for reason, count in refused.most_common())
            line += f" | refused {sum(refused.values())}: {reasons}"
        return line

    def _reset(self, now: float) -> None:
        self._since = now
        self._refused_before = Counter(dict(self._refusals()))
        self._outcomes.clear()
        self._sources.clear()
        self._tokens = 0
        self._busy = 0.0
        self._first_chunks = []
