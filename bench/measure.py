"""The workloads, run against both miners in the same run, interleaved so drift hits both alike.

* soak (first, on fresh miners): ``--soak`` requests one after another, the miner's RSS read
  every ``--soak-every``;
* concurrency: ``k`` validators ask at once, for each ``k`` of ``--streams``, ``--repeats`` times
  (``--single-runs`` times for ``k`` = 1, whose TTFC p99 needs samples);
* throughput: the largest ``k`` with the upstream writing as fast as it can (interval 0), for
  each answer length of ``--throughput-tokens``.

Three servers: this miner, a thin reference (:mod:`bench.thin`: the upstream's SSE parsed by hand
on the same axon; this miner's tokens/s over its own is the headline figure) and SN1's pattern
(:mod:`bench.baseline`).

Latency percentiles pool every sample of every run of a case; wall time, tokens/s and CPU are
medians over its runs. A miner's CPU time and RSS come from ``/proc`` of its own process.
"""

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench import procstat
from bench.serve import KINDS, BenchServer
from bench.stats import RunSamples, analyse, median, ms_percentiles, pooled, ratio, slope_per_1000
from bench.upstream import UpstreamProcess, words
from bench.validators import Validators

SOAK_VALIDATORS = 32  # even 10,000 requests a minute leave each under the default limit of 600


@dataclass(frozen=True)
class Settings:
    streams: tuple[int, ...] = (1, 8, 32, 128)
    tokens: int = 60
    interval: float = 0.01  # 100 tokens/s per stream, about what gpt-4o-mini streams
    batch_size: int = 12
    repeats: int = 3
    single_runs: int = 100  # the 1-stream TTFC p99 needs samples
    throughput_tokens: tuple[int, ...] = (200, 600)
    soak: int = 2000
    soak_every: int = 100
    soak_warmup: int = 50

    def runs_at(self, streams: int) -> int:
        return max(self.repeats, self.single_runs) if streams == 1 else self.repeats


@dataclass
class Run:
    kind: str
    streams: int
    wall: float
    miner_cpu: float
    validator_cpu: float
    upstream_cpu: float
    peak_rss_mb: float
    samples: RunSamples


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(
        self, settings: Settings, upstream: UpstreamProcess, miners: dict[str, BenchServer]
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.miners = miners
        self.validators = Validators()

    def timeout(self, streams: int, tokens: int, interval: float) -> float:
        """Room for the baseline to serve every stream one after another, three times over."""
        return max(30.0, 3.0 * streams * (tokens * interval + 0.5))

    async def run(self, kind: str, streams: int, label: str, tokens: int, interval: float) -> Run:
        miner = self.miners[kind]
        axon = miner.axon_info()
        timeout = self.timeout(streams, tokens, interval)
        miner.reset_peak()
        cpu, own, up = miner.cpu_seconds(), procstat.cpu_seconds(), self.upstream.cpu_seconds()
        started = time.monotonic()
        answers = await asyncio.gather(
            *(self.validators.ask(i, axon, f"bench-{label}-s{i}", timeout) for i in range(streams))
        )
        wall = max(answer.ended for answer in answers) - started
        run = Run(
            kind=kind,
            streams=streams,
            wall=wall,
            miner_cpu=miner.cpu_seconds() - cpu,
            validator_cpu=procstat.cpu_seconds() - own,
            upstream_cpu=self.upstream.cpu_seconds() - up,
            peak_rss_mb=miner.memory_mb()["peak"],
            samples=analyse(answers, self.upstream.dump(), "".join(words(tokens))),
        )
        if run.samples.errors:
            log(f"  {label}: {len(run.samples.errors)} errors, e.g. {run.samples.errors[0]}")
        return run

    # -- workloads ------------------------------------------------------------------------------

    async def concurrency(self) -> dict[str, dict[int, list[Run]]]:
        s = self.settings
        self.upstream.configure(s.tokens, s.interval)
        for kind in KINDS:  # warm-up, not recorded: connections, imports, first-call caches
            await self.run(kind, min(8, max(s.streams)), f"warmup-{kind}", s.tokens, s.interval)
        runs: dict[str, dict[int, list[Run]]] = {kind: {k: [] for k in s.streams} for kind in KINDS}
        for repeat in range(max(s.runs_at(k) for k in s.streams)):
            for k in s.streams:
                if repeat >= s.runs_at(k):
                    continue
                for kind in KINDS:
                    run = await self.run(kind, k, f"{kind}-k{k}-r{repeat}", s.tokens, s.interval)
                    runs[kind][k].append(run)
                    if k > 1 or repeat % 20 == 0:
                        log(f"  {kind:8} {k:4} streams, run {repeat + 1}: {run.wall:.3f}s")
        return runs

    async def throughput(self) -> dict[str, dict[int, list[Run]]]:
        s = self.settings
        streams = max(s.streams)
        runs: dict[str, dict[int, list[Run]]] = {kind: {n: [] for n in s.throughput_tokens} for kind in KINDS}
        for tokens in s.throughput_tokens:
            self.upstream.configure(tokens, 0.0)
            for repeat in range(s.repeats):
                for kind in KINDS:
                    run = await self.run(kind, streams, f"{kind}-tput{tokens}-r{repeat}", tokens, 0.0)
                    runs[kind][tokens].append(run)
                    log(f"  {kind:8} throughput, {tokens} tokens, run {repeat + 1}: {run.samples.tokens / run.wall:,.0f} tokens/s")
        return runs

    async def soak(self, kind: str) -> dict[str, Any]:
        """Sequential requests; the miner's RSS after the warm-up (request 0) and every N after.

        One request at a time, from validators taking turns: one validator alone would exceed
        the miner's per-hotkey rate limit (``--blacklist.max_requests_per_minute``).
        """
        s = self.settings
        miner = self.miners[kind]
        axon = miner.axon_info()
        expected = "".join(words(s.tokens))
        self.upstream.configure(s.tokens, 0.0)
        errors: list[str] = []

        async def ask(label: str, n: int) -> None:
            answer = await self.validators.ask(n % SOAK_VALIDATORS, axon, f"bench-{label}", 30.0)
            if answer.error or answer.status != 200 or answer.text != expected:
                errors.append(f"{label}: {answer.error or f'HTTP {answer.status}' if answer.status != 200 else 'answer differs'}")

        cold = miner.memory_mb()["rss"]
        for n in range(s.soak_warmup):
            await ask(f"soakwarm-{kind}-{n}", n)
        self.upstream.dump()
        points = [(0, miner.memory_mb()["rss"])]
        started = time.monotonic()
        for n in range(1, s.soak + 1):
            await ask(f"soak-{kind}-{n}", n)
            if n % s.soak_every == 0 or n == s.soak:
                points.append((n, miner.memory_mb()["rss"]))
                self.upstream.dump()  # the upstream's records are its memory, not the miner's
        seconds = time.monotonic() - started
        half = s.soak // 2
        at_half = min(points, key=lambda point: abs(point[0] - half))[1]
        log(f"  {kind:8} soak: {s.soak} requests in {seconds:.1f}s, RSS {points[0][1]:.1f} -> {points[-1][1]:.1f} MB")
        return {
            "requests": s.soak,
            "warmup_requests": s.soak_warmup,
            "seconds": round(seconds, 2),
            "errors": len(errors),
            "error_examples": errors[:3],
            "rss_mb_before_warmup": round(cold, 2),
            "rss_mb": {"0": round(points[0][1], 2), str(half): round(at_half, 2), str(s.soak): round(points[-1][1], 2)},
            "rss_series_mb": [[n, round(mb, 2)] for n, mb in points],
            "growth_mb": round(points[-1][1] - points[0][1], 2),
            "growth_second_half_mb": round(points[-1][1] - at_half, 2),
            "slope_mb_per_1k_requests_second_half": _round(slope_per_1000([p for p in points if p[0] >= half])),
        }

    async def everything(self) -> dict[str, Any]:
        try:
            soak = {}
            if self.settings.soak:  # first, on fresh processes: growth is then the requests' own
                log("soak ...")
                soak = {kind: await self.soak(kind) for kind in KINDS}
            log("concurrency ...")
            concurrency = await self.concurrency()
            log("throughput ...")
            throughput = await self.throughput()
        finally:
            await self.validators.close()
        return summarise(self.settings, concurrency, throughput, soak)


# -- summaries ------------------------------------------------------------------------------------


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def per_1k(cpu: float, tokens: int) -> float | None:
    return cpu / tokens * 1000.0 if tokens else None


def summarise_runs(runs: list[Run], reference_wall: float | None) -> dict[str, Any]:
    samples = [run.samples for run in runs]
    wall = median(run.wall for run in runs)
    errors = [error for run in runs for error in run.samples.errors]
    return {
        "runs": len(runs),
        "added_ttfc_ms": ms_percentiles(pooled(samples, "added_ttfc")),
        "ttfc_vs_first_token_ms": ms_percentiles(pooled(samples, "ttfc_vs_first_token")),
        "chunk_added_ms": ms_percentiles(pooled(samples, "chunk_added")),
        "to_upstream_ms": ms_percentiles(pooled(samples, "to_upstream")),
        "validator_ttfc_ms": ms_percentiles(pooled(samples, "validator_ttfc")),
        "wall_s": _round(wall, 4),
        "concurrency_ratio": _round(ratio(wall, reference_wall)),
        "tokens_per_s": _round(median(run.samples.tokens / run.wall for run in runs), 1),
        "cpu_s_per_1k_tokens": _round(median(per_1k(run.miner_cpu, run.samples.tokens) for run in runs), 4),
        "miner_cpu_cores": _round(median(run.miner_cpu / run.wall for run in runs)),
        "validator_cpu_cores": _round(median(run.validator_cpu / run.wall for run in runs)),
        "upstream_cpu_cores": _round(median(run.upstream_cpu / run.wall for run in runs)),
        "peak_rss_mb": _round(max(run.peak_rss_mb for run in runs), 2),
        "errors": len(errors),
        "error_examples": errors[:3],
    }


def summarise(
    settings: Settings,
    concurrency: dict[str, dict[int, list[Run]]],
    throughput: dict[str, dict[int, list[Run]]],
    soak: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    reference = min(settings.streams)
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        reference_wall = median(run.wall for run in concurrency[kind][reference])
        kinds[kind] = {
            "concurrency": {
                str(k): summarise_runs(runs, reference_wall) for k, runs in concurrency[kind].items()
            },
            "throughput": {str(n): summarise_runs(runs, None) for n, runs in throughput[kind].items()},
            "soak": soak.get(kind),
        }
    return {
        "settings": {
            **settings.__dict__, "streams": list(settings.streams), "throughput_tokens": list(settings.throughput_tokens),
            "reference_streams": reference,
        },
        "kinds": kinds,
        "miner_over_thin": over_thin(kinds),
        "baseline_over_miner": compare(kinds),
        "targets": targets(kinds, reference),
    }


def over_thin(kinds: dict[str, Any]) -> dict[str, Any]:
    """This miner's figure over the thin reference's: tokens/s at each answer length (the
    headline: 1.0 is the reference's speed), CPU per token, and wall time at each ``k``."""
    miner, thin = kinds["miner"], kinds["thin"]
    return {
        "throughput": {
            n: {
                "tokens_per_s": _round(ratio(case["tokens_per_s"], thin["throughput"][n]["tokens_per_s"])),
                "cpu_s_per_1k_tokens": _round(ratio(case["cpu_s_per_1k_tokens"], thin["throughput"][n]["cpu_s_per_1k_tokens"])),
            }
            for n, case in miner["throughput"].items()
        },
        "wall": {k: _round(ratio(case["wall_s"], thin["concurrency"][k]["wall_s"])) for k, case in miner["concurrency"].items()},
    }


def compare(kinds: dict[str, Any]) -> dict[str, Any]:
    """Baseline / miner for each figure: above 1 means this miner is better (lower is better)."""

    def pair(get: Any) -> float | None:
        try:
            return _round(ratio(get(kinds["baseline"]), get(kinds["miner"])), 2)
        except (KeyError, TypeError):
            return None

    out: dict[str, Any] = {}
    for k in kinds["miner"]["concurrency"]:
        c = lambda side, k=k: side["concurrency"][k]  # noqa: E731
        out[k] = {
            "added_ttfc_p50": pair(lambda side: c(side)["added_ttfc_ms"]["p50"]),
            "added_ttfc_p99": pair(lambda side: c(side)["added_ttfc_ms"]["p99"]),
            "chunk_added_p50": pair(lambda side: c(side)["chunk_added_ms"]["p50"]),
            "chunk_added_p99": pair(lambda side: c(side)["chunk_added_ms"]["p99"]),
            "validator_ttfc_p50": pair(lambda side: c(side)["validator_ttfc_ms"]["p50"]),
            "wall": pair(lambda side: c(side)["wall_s"]),
            "cpu_s_per_1k_tokens": pair(lambda side: c(side)["cpu_s_per_1k_tokens"]),
        }
    out["throughput_tokens_per_s_miner_over_baseline"] = {
        n: _round(ratio(case["tokens_per_s"], kinds["baseline"]["throughput"][n]["tokens_per_s"]), 2)
        for n, case in kinds["miner"]["throughput"].items()
    }
    return out


def targets(kinds: dict[str, Any], reference: int) -> list[dict[str, Any]]:
    """The issues' targets against this miner's figures; ``met`` is None when not measured."""
    miner = kinds["miner"]
    concurrency = miner["concurrency"]
    throughput = miner["throughput"]
    shortest, longest = min(throughput, key=int), max(throughput, key=int)
    thin = over_thin(kinds)["throughput"]
    one = concurrency.get("1", {})
    thirty_two = concurrency.get("32", {})
    soak = miner.get("soak") or {}

    def check(name: str, value: float | None, limit: float, *, at_least: bool = False) -> dict[str, Any]:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        return {"target": name, "value": value, "limit": limit, "met": met}

    return [
        check("added TTFC p50 at 1 stream (ms) <= 2", one.get("added_ttfc_ms", {}).get("p50"), 2.0),
        check("added TTFC p99 at 1 stream (ms) <= 25", one.get("added_ttfc_ms", {}).get("p99"), 25.0),
        check("per-chunk added p50 at 1 stream (ms) <= 2", one.get("chunk_added_ms", {}).get("p50"), 2.0),
        check("wall at 32 streams / 1 stream <= 1.3", thirty_two.get("concurrency_ratio"), 1.3),
        check(
            f"streamed tokens/s through one miner, {shortest} tokens an answer >= 5000",
            throughput[shortest]["tokens_per_s"], 5000.0, at_least=True,
        ),
        check(
            f"tokens/s over the thin reference's, {longest} tokens an answer >= 0.6",
            thin[longest]["tokens_per_s"], 0.6, at_least=True,
        ),
        check(
            f"miner CPU per token, {shortest} tokens an answer (ms) <= 0.08",
            throughput[shortest]["cpu_s_per_1k_tokens"], 0.08,
        ),
        check(
            "RSS slope over the 2nd half of the soak (MB / 1k requests) <= 1",
            soak.get("slope_mb_per_1k_requests_second_half"), 1.0,
        ),
    ]
