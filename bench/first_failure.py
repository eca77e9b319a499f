"""``python -m bench.first_failure``: how soon the first requests a failing upstream leaves are answered.

The case a user meets when the upstream breaks: ``openai-miner --mock --openai.base_url URL`` in
its own process, a key set, an upstream answering HTTP 500 to every request, and several
validators (real dendrites) asking at once as soon as the miner serves. Two modes: the local model
preloaded at start (the default with a key) and loaded by the first failing request
(``--no-fallback.preload``). Every run starts a fresh miner, so every run measures first failures.

Writes ``<out>/first_failure.json`` and ``<out>/first_failure.md``. Times are
``time.monotonic()`` seconds at the validator: from the request to its first chunk (TTFC) and
from the miner's start to its summary line (when it serves).
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import bittensor as bt

from bench.record import Started, header, save
from bench.stats import median
from bench.validators import Validators
from openai_miner.testing.localnet import OPEN_TO_ALL, axon_info, free_port, miner_argv
from openai_miner.testing.process import MinerProcess, miner_env
from openai_miner.testing.upstream import Fault, LoopbackUpstream

MODES = {"preloaded": [], "lazy": ["--no-fallback.preload"]}
LOADING = "requests that need it wait for it"  # LocalSource's once-per-load warning


def start_miner(
    workdir: Path, upstream: str, model: str | None, flags: list[str], access: Sequence[str] = OPEN_TO_ALL,
    *, start_timeout: float = 300.0,
) -> MinerProcess:
    """The installed ``openai-miner`` command, as a user runs it, with a (fake) key set, its output in
    ``workdir/miner.log``; it serves once entered (``with``). Its axon port: ``ports["axon"]``.

    ``access``: who may ask (by default any hotkey, since the benchmark's validators are on no chain)."""
    argv = miner_argv(
        workdir / "wallets", free_port(), "--openai.base_url", upstream, *access,
        *(["--fallback.model", model] if model else []), *flags,
    )
    env = miner_env(workdir, OPENAI_API_KEY="sk-bench-not-a-key")
    return MinerProcess(argv, env=env, cwd=workdir, log_file=workdir / "miner.log", start_timeout=start_timeout)


def add_miner_args(parser: argparse.ArgumentParser) -> None:
    """The flags of every benchmark that starts the real miner with a local model: which model, how
    long it may take to start, where the results go."""
    parser.add_argument("--model", default=None, help="--fallback.model (default: the miner's own)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a miner to start serving")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")


async def ask_at_once(validators: Validators, axon: object, count: int, question: str, timeout: float) -> list[dict[str, Any]]:
    streams = await asyncio.gather(
        *(validators.ask(i, axon, f"v{i}", timeout, message=question) for i in range(count))
    )
    return [
        {
            "status": s.status,
            "ttfc_s": round(s.chunk_times[0] - s.started, 3) if s.chunk_times else None,
            "total_s": round(s.ended - s.started, 3),
            "chars": len(s.text.strip()),
            "error": s.error or (s.message if s.status != 200 else None),
        }
        for s in streams
    ]


def run_once(mode: str, args: argparse.Namespace, upstream: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="openai-miner-first-failure-") as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        with start_miner(workdir, upstream, args.model, MODES[mode], start_timeout=args.start_timeout) as miner:
            ready_s = time.monotonic() - started
            wallet = bt.Wallet(name="miner", hotkey="default", path=str(workdir / "wallets"))
            axon = axon_info(miner.ports["axon"], wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)

            async def ask() -> list[dict[str, Any]]:
                validators = Validators()
                try:
                    return await ask_at_once(validators, axon, args.validators, args.question, args.timeout)
                finally:
                    await validators.close()

            streams = asyncio.run(ask())
        return {"ready_s": round(ready_s, 3), "streams": streams, "load_logged": (workdir / "miner.log").read_text().count(LOADING)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    streams = [s for run in runs for s in run["streams"]]
    ttfc = [s["ttfc_s"] for s in streams if s["ttfc_s"] is not None]
    return {
        "ready_s_median": median(run["ready_s"] for run in runs),
        "ttfc_s_median": median(ttfc),
        "ttfc_s_max": max(ttfc, default=None),
        "answered": sum(s["status"] == 200 and s["chars"] > 0 for s in streams),
        "asked": len(streams),
        "runs": runs,
    }


def markdown(results: dict[str, Any]) -> str:
    meta, s = results["meta"], results["settings"]
    lines = [
        header(meta),
        "",
        f"Upstream answering HTTP 500 to every request; {s['validators']} validators ask at once as soon as "
        f"the miner serves, timeout {s['timeout']:g} s; {s['runs']} fresh miner(s) per mode. Medians over runs "
        "(start-up) and over every first failing request (TTFC).",
        "",
        "| mode | miner serves after | first chunk, median / max | answered with text |",
        "|---|---:|---:|---:|",
    ]
    for mode, figures in results["modes"].items():
        flag = " ".join(MODES[mode]) or "default"
        lines.append(
            f"| {mode} (`{flag}`) | {figures['ready_s_median']:.1f} s "
            f"| {_s(figures['ttfc_s_median'])} / {_s(figures['ttfc_s_max'])} "
            f"| {figures['answered']}/{figures['asked']} |"
        )
    return "\n".join(lines) + "\n"


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.first_failure", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh miners per mode")
    parser.add_argument("--validators", type=int, default=2, help="validators asking at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="each validator's timeout (s)")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    add_miner_args(parser)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.validators < 1 or args.timeout <= 0:
        parser.error("runs and validators must be positive, and so must the timeout")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = Started("bench.first_failure", argv)
    with LoopbackUpstream(tokens=["never sent"], fault=Fault(status=500)) as upstream:
        modes = {mode: summarise([run_once(mode, args, upstream.base_url) for _ in range(args.runs)]) for mode in args.modes}
    results = {
        "meta": started.meta(),
        "settings": {"runs": args.runs, "validators": args.validators, "timeout": args.timeout, "model": args.model},
        "modes": modes,
    }
    save(args.out, "first_failure", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
