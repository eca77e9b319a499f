"""From timestamps to figures: what one run's streams say, and summaries over several runs."""

import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from bench.validators import tokens_so_far
from openai_miner.testing.validator import Answer


@dataclass
class RunSamples:
    """Latency samples (seconds) of one run, and its counts."""

    added_ttfc: list[float] = field(default_factory=list)  # first chunk - its last token upstream
    ttfc_vs_first_token: list[float] = field(default_factory=list)  # first chunk - first token upstream
    chunk_added: list[float] = field(default_factory=list)  # each chunk - its last token upstream
    to_upstream: list[float] = field(default_factory=list)  # upstream got the request - validator asked
    validator_ttfc: list[float] = field(default_factory=list)  # first chunk - validator asked
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def analyse(streams: Iterable[Answer], upstream: dict[str, dict[str, Any]], expected: str) -> RunSamples:
    """Match each stream to the upstream request carrying its marker and measure the gaps.

    A chunk's added latency is its arrival at the validator minus the time the upstream wrote the
    last token the chunk contains: what the miner (axon, drain, batching aside) and the dendrite
    add to that token. Chunks may coalesce on the wire; counting the words tells which tokens
    arrived.
    """
    samples = RunSamples()
    for stream in streams:
        record = upstream.get(stream.label)
        if stream.error or stream.status != 200 or record is None or stream.text != expected:
            why = stream.error or (f"HTTP {stream.status}: {stream.message}" if stream.status != 200 else None)
            why = why or ("no upstream request" if record is None else "answer differs from the upstream's")
            samples.errors.append(f"{stream.label}: {why}")
            continue
        sent = record["token_times"]
        samples.tokens += len(sent)
        samples.to_upstream.append(record["received_at"] - stream.started)
        first = True
        for arrived, count in zip(stream.chunk_times, tokens_so_far(stream)):
            if count == 0:
                continue
            added = arrived - sent[count - 1]
            samples.chunk_added.append(added)
            if first:
                samples.added_ttfc.append(added)
                samples.ttfc_vs_first_token.append(arrived - sent[0])
                samples.validator_ttfc.append(arrived - stream.started)
                first = False
    return samples


def pooled(runs: Iterable[RunSamples], name: str) -> list[float]:
    return [value for run in runs for value in getattr(run, name)]


def ms_percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds (None without samples), and how many samples."""
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    p50, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3), "n": len(values)}


def first_chunk_s(answers: Iterable[Answer]) -> dict[str, float | None]:
    """p50 and p99 of the validators' time to first chunk, in seconds (None without one)."""
    firsts = [answer.first_chunk for answer in answers if answer.first_chunk is not None]
    if not firsts:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(firsts, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def slope_per_1000(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (requests, MB) points, in MB per 1,000 requests."""
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 1000.0)
