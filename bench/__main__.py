"""``python -m bench``: run the benchmark on 127.0.0.1 and write JSON, markdown and a PNG plot.

Writes ``<out>/latest.json`` (every figure), ``<out>/latest.md`` (the README table) and
``<out>/latest.png`` (the plot). ``--smoke`` is a few-second configuration for CI: it checks that
the benchmark runs, its figures mean nothing.
"""

import argparse
import asyncio
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from bench.record import Started, save
from bench.measure import Bench, Settings, log
from bench.serve import KINDS
from bench.report import markdown

SMOKE = Settings(
    streams=(1, 4), tokens=8, interval=0.001, repeats=1, single_runs=2,
    throughput_tokens=(24,), soak=10, soak_every=5, soak_warmup=1,
)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=list(d.streams), help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=d.tokens, help="tokens in each answer")
    parser.add_argument("--interval", type=float, default=d.interval, help="seconds between upstream tokens")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="tokens per chunk (the miners' flag)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs of each case")
    parser.add_argument("--single-runs", type=int, default=d.single_runs, help="runs at 1 stream (TTFC samples)")
    parser.add_argument("--throughput-tokens", type=int, nargs="+", default=list(d.throughput_tokens),
                        help="tokens per answer in the throughput cases (interval 0, largest --streams)")
    parser.add_argument("--soak", type=int, default=d.soak, help="sequential requests for RSS growth (0: skip)")
    parser.add_argument("--soak-every", type=int, default=d.soak_every, help="read RSS every N soak requests")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast configuration for CI (overrides the rest)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.streams + args.throughput_tokens) or args.tokens < 1 or args.repeats < 1 or args.interval < 0:
        parser.error("streams, tokens and repeats must be positive, interval not negative")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return SMOKE
    return replace(
        Settings(),
        streams=tuple(sorted(set(args.streams))), tokens=args.tokens, interval=args.interval,
        batch_size=args.batch_size, repeats=args.repeats, single_runs=args.single_runs,
        throughput_tokens=tuple(sorted(set(args.throughput_tokens))), soak=args.soak, soak_every=args.soak_every,
    )


def run(settings: Settings, workdir: Path) -> dict:
    from bench.serve import BenchServer
    from bench.upstream import UpstreamProcess

    upstream = UpstreamProcess(settings.tokens, settings.interval, workdir / "upstream.log")
    miners: dict[str, BenchServer] = {}
    try:
        miners = {kind: BenchServer(kind, upstream.base_url, workdir, settings.batch_size) for kind in KINDS}
        for miner in miners.values():
            miner.wait_ready()
        results = asyncio.run(Bench(settings, upstream, miners).everything())
    except BaseException:
        for miner in miners.values():
            if miner.log.exists():
                log(f"--- {miner.kind} log (tail) ---\n{miner.log.read_text()[-2000:]}")
        raise
    finally:
        for miner in miners.values():
            miner.stop()
        upstream.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    settings = settings_of(args)
    started = Started("bench", argv)
    with tempfile.TemporaryDirectory(prefix="openai-miner-bench-") as workdir:
        results = run(settings, Path(workdir))
    import bittensor

    results = {"meta": {**started.meta(), "bittensor": bittensor.__version__}, **results}
    save(args.out, "latest", results, markdown(results))
    if not args.no_plot:
        from bench.plot import plot

        plot(results, args.out / "latest.png")
    log(f"wrote {args.out / 'latest.json'} in {results['meta']['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
