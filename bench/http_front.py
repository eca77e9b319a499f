"""``python -m bench.http_front``: the miner's HTTP front beside a thin pass-through of the same upstream.

Three processes on 127.0.0.1 besides this one: the loopback upstream (:mod:`bench.upstream`), the
miner serving only its HTTP front (``--axon.off --http.port``), and :mod:`bench.passthrough`, a
Starlette app relaying the upstream's SSE bytes untouched. Both are asked the same thing in the
same run, interleaved: ``k`` clients at once for each ``k`` of ``--streams``, each a signed
request (Epistula v2, as SN1's validators signed) to the miner and a plain one to the
pass-through, read as SSE with httpx. Then the largest ``k`` with the upstream writing as fast as
it can, for tokens/s through one process.

Figures, per server: added TTFC (first chunk at the client minus the upstream's write of the last
token in it), the wall time of ``k`` streams over that of one (concurrency ratio), tokens/s, CPU.
Writes ``<out>/http.json`` and ``<out>/http.md``.
"""

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
from bittensor_wallet import Keypair

from bench.record import Started, header, save
from bench.serve import HTTP_KINDS, BenchServer
from bench.stats import RunSamples, analyse, median, ms_percentiles, pooled, ratio
from bench.upstream import UpstreamProcess, words
from bench.validators import prompt
from openai_miner.testing.validator import Answer, ask_http, signing_client

TIMEOUT = 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Clients:
    """One httpx client per concurrent stream: signed for the miner, plain for the pass-through."""

    def __init__(self, miner_hotkey: str) -> None:
        self.miner_hotkey = miner_hotkey
        self._clients: dict[tuple[str, int], httpx.AsyncClient] = {}

    def get(self, kind: str, index: int) -> httpx.AsyncClient:
        if (kind, index) not in self._clients:
            if kind == "http":
                seed = hashlib.sha256(f"bench-http-validator-{index}".encode()).hexdigest()
                client = signing_client(Keypair.create_from_seed("0x" + seed), self.miner_hotkey, timeout=TIMEOUT)
            else:
                client = httpx.AsyncClient(timeout=TIMEOUT)
            self._clients[(kind, index)] = client
        return self._clients[(kind, index)]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


async def ask(client: httpx.AsyncClient, port: int, marker: str) -> Answer:
    """One streamed chat completion, every content chunk timed as it arrives."""
    return await ask_http(client, port, prompt(marker), TIMEOUT, label=marker)


async def run_case(
    kind: str, server: BenchServer, clients: Clients, upstream: UpstreamProcess, k: int, label: str, tokens: int
) -> dict[str, Any]:
    cpu = server.cpu_seconds()
    started = time.monotonic()
    answers = await asyncio.gather(
        *(ask(clients.get(kind, i), server.port, f"bench-{label}-s{i}") for i in range(k))
    )
    wall = max(answer.ended for answer in answers) - started
    samples = analyse(answers, upstream.dump(), "".join(words(tokens)))
    if samples.errors:
        log(f"  {label}: {len(samples.errors)} errors, e.g. {samples.errors[0]}")
    return {"wall": wall, "cpu": server.cpu_seconds() - cpu, "samples": samples}


def summary(runs: list[dict[str, Any]], reference_wall: float | None) -> dict[str, Any]:
    samples: list[RunSamples] = [run["samples"] for run in runs]
    wall = median(run["wall"] for run in runs)
    tokens = [run["samples"].tokens for run in runs]
    return {
        "runs": len(runs),
        "added_ttfc_ms": ms_percentiles(pooled(samples, "added_ttfc")),
        "chunk_added_ms": ms_percentiles(pooled(samples, "chunk_added")),
        "wall_s": None if wall is None else round(wall, 4),
        "concurrency_ratio": _round(ratio(wall, reference_wall)),
        "tokens_per_s": _round(median(t / run["wall"] for t, run in zip(tokens, runs)), 1),
        "cpu_s_per_1k_tokens": _round(median(run["cpu"] / t * 1000 for t, run in zip(tokens, runs) if t)),
        "errors": sum(len(s.errors) for s in samples),
        "error_examples": [e for s in samples for e in s.errors][:3],
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


async def measure(args: argparse.Namespace, servers: dict[str, BenchServer], upstream: UpstreamProcess) -> dict[str, Any]:
    clients = Clients(servers["http"].info["hotkey"])
    streams = sorted(set(args.streams))
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {kind: {k: [] for k in streams} for kind in HTTP_KINDS}
    try:
        upstream.configure(args.tokens, args.interval)
        for kind in HTTP_KINDS:  # warm-up: connections, imports, first-call caches
            await run_case(kind, servers[kind], clients, upstream, min(8, streams[-1]), f"warmup-{kind}", args.tokens)
        for repeat in range(args.repeats):
            for k in streams:
                for kind in HTTP_KINDS:
                    run = await run_case(kind, servers[kind], clients, upstream, k, f"{kind}-k{k}-r{repeat}", args.tokens)
                    runs[kind][k].append(run)
                    log(f"  {kind:11} {k:4} streams, run {repeat + 1}: {run['wall']:.3f}s")
        upstream.configure(args.throughput_tokens, 0.0)
        throughput = {
            kind: [
                await run_case(kind, servers[kind], clients, upstream, streams[-1], f"{kind}-tp{r}", args.throughput_tokens)
                for r in range(args.repeats)
            ]
            for kind in HTTP_KINDS
        }
    finally:
        await clients.close()
    kinds = {}
    for kind in HTTP_KINDS:
        reference = median(run["wall"] for run in runs[kind][streams[0]])
        kinds[kind] = {
            "concurrency": {str(k): summary(runs[kind][k], reference) for k in streams},
            "throughput": summary(throughput[kind], None),
        }
    return {"kinds": kinds, "http_over_passthrough": compare(kinds, streams)}


def compare(kinds: dict[str, Any], streams: list[int]) -> dict[str, Any]:
    """The miner's figure over the pass-through's (1.0: as cheap as relaying the upstream)."""
    miner, reference = kinds["http"]["concurrency"], kinds["passthrough"]["concurrency"]
    out: dict[str, Any] = {}
    for k in map(str, streams):
        out[k] = {
            "wall": _round(ratio(miner[k]["wall_s"], reference[k]["wall_s"])),
            "concurrency_ratio": _round(ratio(miner[k]["concurrency_ratio"], reference[k]["concurrency_ratio"])),
            "added_ttfc_p50_ms_difference": _round(
                None if miner[k]["added_ttfc_ms"]["p50"] is None or reference[k]["added_ttfc_ms"]["p50"] is None
                else miner[k]["added_ttfc_ms"]["p50"] - reference[k]["added_ttfc_ms"]["p50"]
            ),
        }
    out["throughput_tokens_per_s"] = _round(
        ratio(kinds["http"]["throughput"]["tokens_per_s"], kinds["passthrough"]["throughput"]["tokens_per_s"])
    )
    return out


def markdown(results: dict[str, Any]) -> str:
    meta, s = results["meta"], results["settings"]
    lines = [
        header(meta),
        "",
        f"{s['tokens']} tokens per answer, one every {s['interval'] * 1000:g} ms; medians over {s['repeats']} run(s).",
        "",
        "| streams | server | added TTFC p50 / p99 (ms) | wall (s) | wall k / wall 1 | tokens/s | errors |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for k in map(str, s["streams"]):
        for kind in HTTP_KINDS:
            c = results["kinds"][kind]["concurrency"][k]
            lines.append(
                f"| {k} | {kind} | {c['added_ttfc_ms']['p50']} / {c['added_ttfc_ms']['p99']} | {c['wall_s']} "
                f"| {c['concurrency_ratio']} | {c['tokens_per_s']} | {c['errors']} |"
            )
    for kind in HTTP_KINDS:
        t = results["kinds"][kind]["throughput"]
        lines.append(f"| {s['streams'][-1]}, upstream unpaced | {kind} | | {t['wall_s']} | | {t['tokens_per_s']} | {t['errors']} |")
    lines += ["", "HTTP front over pass-through: " + json.dumps(results["http_over_passthrough"])]
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http_front", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-tokens", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI: figures mean nothing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.streams, args.tokens, args.interval, args.repeats, args.throughput_tokens = [1, 4], 8, 0.001, 1, 16
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = Started("bench.http_front", argv)
    with tempfile.TemporaryDirectory(prefix="openai-miner-bench-http-") as tmp:
        workdir = Path(tmp)
        upstream = UpstreamProcess(args.tokens, args.interval, workdir / "upstream.log")
        servers: dict[str, BenchServer] = {}
        try:
            servers = {kind: BenchServer(kind, upstream.base_url, workdir, args.batch_size) for kind in HTTP_KINDS}
            for server in servers.values():
                server.wait_ready()
            figures = asyncio.run(measure(args, servers, upstream))
        finally:
            for server in servers.values():
                server.stop()
            upstream.stop()
    results = {
        "meta": started.meta(),
        "settings": {
            "streams": sorted(set(args.streams)), "tokens": args.tokens, "interval": args.interval,
            "batch_size": args.batch_size, "repeats": args.repeats, "throughput_tokens": args.throughput_tokens,
        },
        **figures,
    }
    save(args.out, "http", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
