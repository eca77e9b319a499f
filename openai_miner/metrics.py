"""The answers as Prometheus metrics, for an operator's Grafana rather than the log.

Each :class:`~openai_miner.core.Core` counts into a :class:`Metrics` of its own, on a registry of
its own (not prometheus_client's global one), so that two miners in one process (tests, the
benchmark) never share counts; ``--metrics.port`` serves it (:mod:`openai_miner.fronts.metrics`).
Labels are few and bounded (front, outcome, source, the kind of a refusal or of an upstream
error): no hotkey, so the number of series stays small whatever callers send. What is counted
elsewhere (refusals, upstream errors, the local batch, the spend) is read at each scrape by a
collector, never copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from openai_miner.budget import DailyBudget

FIRST_CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Seconds to the first chunk: a streaming upstream's first token takes 0.1 to 2 s, the local model's less."""
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0)
"""Seconds an answer takes: SN1 validators' timeouts are about 10 to 15 s."""


class CountsCollector(Collector):
    """A counter family of one label, read at each scrape from running totals kept where they are
    counted: the access policy's refusals by kind (:attr:`~openai_miner.access.Refusals.totals`),
    which every front counts into, or the upstream's failed attempts by kind
    (:func:`~openai_miner.sources.upstream_errors`)."""

    def __init__(self, name: str, documentation: str, label: str, totals: Callable[[], Mapping[str, int]]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for kind, count in sorted(self.totals().items()):
            family.add_metric([kind], count)
        yield family


class FallbackCollector(Collector):
    """1 while the circuit breaker skips the upstream (the local model answers every request), else 0."""

    def __init__(self, active: Callable[[], bool]) -> None:
        self.active = active

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "openai_miner_fallback_active", "1 while the upstream is skipped and the local model answers.",
            value=int(self.active()),
        )


class LocalLoadCollector(Collector):
    """The local model's batch size and queue depth now (:func:`~openai_miner.sources.local_load`)."""

    def __init__(self, load: Callable[[], tuple[int, int]]) -> None:
        self.load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        generating, waiting = self.load()
        yield GaugeMetricFamily(
            "openai_miner_local_generating", "Requests the local model generates for now (its batch size).",
            value=generating,
        )
        yield GaugeMetricFamily(
            "openai_miner_local_waiting", "Requests waiting for a place in the local model's batch.", value=waiting
        )


class BudgetCollector(Collector):
    """The upstream's tokens spent today (UTC) and the daily budget they are counted against
    (``--openai.daily_token_budget``), read at each scrape from the budget itself
    (:meth:`~openai_miner.budget.DailyBudget.reading`: a new UTC day reads 0 before anything is spent)."""

    def __init__(self, budget: DailyBudget) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spent, limit = self.budget.reading()
        yield GaugeMetricFamily(
            "openai_miner_upstream_tokens_spent_today",
            "Upstream tokens (prompt + completion) spent today, UTC; back to 0 at midnight.", value=spent,
        )
        yield GaugeMetricFamily(
            "openai_miner_upstream_token_budget", "Upstream tokens the miner may spend a UTC day.", value=limit
        )


class Metrics:
    """Counters and histograms of one core's answers, and what is read at each scrape from where it
    is counted: its access policy's refusals, and, each when the miner has it (``None``: no such
    series), whether the fallback is active, the upstream's errors by kind, the local model's batch
    and queue, and the day's spend against the upstream's daily budget (``Core.budget``)."""

    def __init__(
        self,
        refusals: Callable[[], Mapping[str, int]] = dict,
        fallback_active: Callable[[], bool] | None = None,
        *,
        upstream_errors: Callable[[], Mapping[str, int]] | None = None,
        local_load: Callable[[], tuple[int, int]] | None = None,
        budget: DailyBudget | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(CountsCollector(
            "openai_miner_refusals", "Requests refused before any model work, by kind.", "reason", refusals
        ))
        if fallback_active is not None:
            self.registry.register(FallbackCollector(fallback_active))
        if upstream_errors is not None:
            self.registry.register(CountsCollector(
                "openai_miner_upstream_errors", "Failed upstream attempts (retried ones too), by HTTP status or kind.",
                "kind", upstream_errors,
            ))
        if local_load is not None:
            self.registry.register(LocalLoadCollector(local_load))
        if budget is not None:
            self.registry.register(BudgetCollector(budget))
        self.answers = Counter(
            "openai_miner_answers", "Answers given, by front, outcome and the source that answered.",
            ["front", "outcome", "source"], registry=self.registry,
        )
        self.tokens = Counter(
            "openai_miner_tokens_out", "Tokens sent to callers, by front and source.",
            ["front", "source"], registry=self.registry,
        )
        self.first_chunk = Histogram(
            "openai_miner_first_chunk_seconds", "Seconds from the start of an answer to its first chunk sent.",
            ["front"], buckets=FIRST_CHUNK_BUCKETS, registry=self.registry,
        )
        self.duration = Histogram(
            "openai_miner_answer_seconds", "Seconds an answer took, first token to last chunk or deadline.",
            ["front"], buckets=DURATION_BUCKETS, registry=self.registry,
        )

    def observe(self, front: str, outcome: str, source: str, tokens: int, first_chunk: float | None, duration: float) -> None:
        """Count one answer."""
        self.answers.labels(front, outcome, source).inc()
        self.tokens.labels(front, source).inc(tokens)
        if first_chunk is not None:
            self.first_chunk.labels(front).observe(first_chunk)
        self.duration.labels(front).observe(duration)
