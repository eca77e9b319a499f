"""``python -m bench.local_load``: does the local model keep its promise with a core busy elsewhere?

The real ``openai-miner --mock`` process, a key set, the local model loaded, the loopback upstream,
and ``--validators`` validators (real dendrites) asking at once. Three cases, each on a quiet
machine and beside a busy loop in another process (``a core busy``), in the same run:

- ``failing``: the upstream answers HTTP 500 at once; the local model answers everyone within
  ``--timeout``: time to first chunk (p50, last) and answers with text;
- ``stalled``: the upstream takes every request and never sends a token, so the local model only
  starts at ``--fallback.first_token_share`` of the time: answers with text;
- ``cut``: the upstream fails and every answer is cut at a short deadline (``--cut-timeout``), the
  model still generating: the miner's CPU seconds in the 0.5 s and 3 s after the last answer ended,
  and how long it stayed busy (its CPU over 0.1 s windows above half a core).

``--threads`` runs one miner per ``--fallback.threads`` value (0: the miner's default, one fewer
than the cores; the number of cores: how it ran before). Every request tries the upstream
(``--fallback.failures`` is set high): no case inherits an open breaker from the one before.
Writes ``<out>/local_load.json`` and ``<out>/local_load.md``.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import bittensor as bt

from bench import procstat
from bench.first_failure import add_miner_args, start_miner
from bench.record import Started, header, save
from bench.stats import first_chunk_s
from bench.validators import Validators
from openai_miner.testing.localnet import axon_info
from openai_miner.testing.upstream import Fault, LoopbackUpstream

LOADS = ("quiet", "a core busy")
CASES = ("failing", "stalled", "cut")
QUESTION = "Tell me a long story about a river and the town beside it."
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]  # another program holding a core
BUSY_SHARE = 0.5  # of a core: the miner counts as busy above it (idle, its own loops take a few percent)


async def ask_all(validators: Validators, axon: bt.AxonInfo, count: int, timeout: float) -> list[Any]:
    return list(
        await asyncio.gather(*(validators.ask(i, axon, f"v{i}", timeout, message=QUESTION) for i in range(count)))
    )


async def cpu_after(pid: int, seconds: float, step: float = 0.1) -> list[float]:
    """The miner's CPU seconds in each ``step`` window for ``seconds``, from now."""
    windows, before = [], procstat.cpu_seconds(pid)
    for _ in range(round(seconds / step)):
        await asyncio.sleep(step)
        now = procstat.cpu_seconds(pid)
        windows.append(now - before)
        before = now
    return windows


def busy_for(windows: list[float], step: float = 0.1) -> float:
    """Seconds until the last window above :data:`BUSY_SHARE` of a core ended."""
    busy_windows = [i for i, cpu in enumerate(windows) if cpu > BUSY_SHARE * step]
    return round((busy_windows[-1] + 1) * step, 1) if busy_windows else 0.0


async def case(name: str, upstream: LoopbackUpstream, axon: bt.AxonInfo, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    upstream.fault = Fault(delay_before_headers=3600) if name == "stalled" else Fault(status=500)
    validators = Validators()
    try:
        answers = await ask_all(validators, axon, args.validators, args.cut_timeout if name == "cut" else args.timeout)
        windows = await cpu_after(pid, 3.0) if name == "cut" else []
    finally:
        await validators.close()
    firsts = [a.first_chunk for a in answers if a.first_chunk is not None]
    result: dict[str, Any] = {
        "asked": len(answers),
        "answered_with_text": sum(a.ok for a in answers),
        "first_chunk_s": first_chunk_s(answers),
        "last_first_chunk_s": round(max(firsts), 2) if firsts else None,
    }
    if windows:
        result.update(
            cpu_s_first_half_second=round(sum(windows[:5]), 2),
            cpu_s_3s=round(sum(windows), 2),
            busy_after_cut_s=busy_for(windows),
        )
    return result


def run_miner(threads: int, args: argparse.Namespace, upstream: LoopbackUpstream) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="openai-miner-local-load-") as tmp:
        workdir = Path(tmp)
        flags = [
            "--fallback.threads", str(threads), "--fallback.failures", "1000000", "--openai.max_retries", "0",
            *(["--fallback.device", args.device] if args.device else []),
            *(["--neuron.streaming_batch_size", str(args.batch_size)] if args.batch_size else []),
        ]
        results: dict[str, Any] = {}
        with start_miner(workdir, upstream.base_url, args.model, flags, start_timeout=args.start_timeout) as miner:
            wallet = bt.Wallet(name="miner", hotkey="default", path=str(workdir / "wallets"))
            axon = axon_info(miner.ports["axon"], wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)

            async def everything() -> None:
                warm = Validators()  # a fresh process's first answers are slower: not measured
                await warm.ask(0, axon, "warm", args.cut_timeout, message=QUESTION)
                await warm.close()
                for load in LOADS:
                    hog = subprocess.Popen(BUSY_LOOP) if load != "quiet" else None
                    try:
                        for name in CASES:
                            results[f"{name}, {load}"] = figures = await case(name, upstream, axon, miner.pid, args)
                            print(f"  threads {threads or 'auto'}: {name}, {load}: {brief(figures)}", file=sys.stderr, flush=True)
                    finally:
                        if hog is not None:
                            procstat.stop(hog)

            try:
                asyncio.run(everything())
            finally:
                upstream.fault = None
    return results


def brief(figures: dict[str, Any]) -> str:
    text = (f"{figures['answered_with_text']}/{figures['asked']} answered, first chunk p50 "
            f"{figures['first_chunk_s']['p50']} s, last {figures['last_first_chunk_s']} s")
    if "busy_after_cut_s" in figures:
        text += f"; after the cut {figures['cpu_s_first_half_second']} CPU s in 0.5 s, busy {figures['busy_after_cut_s']} s"
    return text


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        header(results["meta"]),
        "",
        f"{s['validators']} validators at once; {s['timeout']:g} s timeout ({s['cut_timeout']:g} s for `cut`); "
        f"model {s['model'] or 'the default'}; {s['batch_size'] or 'the default'} tokens a chunk; "
        "`a core busy`: a busy loop in another process.",
        "",
        "| threads | case | answered | first chunk p50 / last (s) | CPU s 0.5 s / 3 s after the cut | busy after the cut (s) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for threads, cases in results["threads"].items():
        for name, c in cases.items():
            cut = (f"{c['cpu_s_first_half_second']} / {c['cpu_s_3s']} | {c['busy_after_cut_s']}"
                   if "busy_after_cut_s" in c else " | ")
            lines.append(
                f"| {threads} | {name} | {c['answered_with_text']}/{c['asked']} "
                f"| {c['first_chunk_s']['p50']} / {c['last_first_chunk_s']} | {cut} |"
            )
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.local_load", description=__doc__.splitlines()[0])
    parser.add_argument("--validators", type=int, default=6, help="validators asking at once")
    parser.add_argument("--timeout", type=float, default=20.0, help="each validator's timeout (s)")
    parser.add_argument("--cut-timeout", type=float, default=6.0, help="the timeout of the `cut` case (s)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0],
        help=f"--fallback.threads of each miner (0: the default; {os.cpu_count()}: every core, as before)",
    )
    parser.add_argument("--device", default=None, help="--fallback.device (default: the miner's own)")
    parser.add_argument("--batch-size", type=int, default=None, help="tokens per chunk (default: the miner's own)")
    add_miner_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = Started("bench.local_load", argv)
    with LoopbackUpstream(tokens=["never sent"]) as upstream:
        by_threads = {str(threads): run_miner(threads, args, upstream) for threads in args.threads}
    results = {
        "meta": started.meta(),
        "settings": {
            "validators": args.validators, "timeout": args.timeout, "cut_timeout": args.cut_timeout,
            "model": args.model, "device": args.device, "threads": args.threads, "batch_size": args.batch_size,
        },
        "threads": by_threads,
    }
    save(args.out, "local_load", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
