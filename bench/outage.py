"""``python -m bench.outage``: every validator answered while the upstream is down?

The outage an operator meets: the real ``openai-miner --mock`` process with a key set, an
upstream answering HTTP 500 to everything, and ``k`` validators (real dendrites) asking at once,
for each ``k`` of ``--validators``, each with ``--timeout`` seconds. The local model answers them
all: in one continuous batch (the default, ``--fallback.max_batch 32``) and, in the same run,
one at a time (``--fallback.max_batch 1``, how it answered before batching). One miner per mode,
loaded once; the breaker is open after the first failures, as in a real outage.

Figures per mode and ``k``: validators answered with text, time to first chunk p50/p99, and the
local model's tokens/s (tokens the miner logged as sent, over the case's wall time). Writes
``<out>/outage.json`` and ``<out>/outage.md``.
"""

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import bittensor as bt

from bench.record import Started, header, save
from bench.first_failure import add_miner_args, start_miner
from bench.stats import first_chunk_s
from bench.validators import Validators
from openai_miner.testing.localnet import axon_info
from openai_miner.testing.upstream import Fault, LoopbackUpstream

MODES = {"batched": [], "one at a time": ["--fallback.max_batch", "1"]}
QUESTION = "Write a haiku about rivers."
SENT = re.compile(r": (\d+) tokens in \d+ chunks via")  # the core's line for each answer (debug level)


async def ask_all(validators: Validators, axon: object, count: int, args: argparse.Namespace, offset: int) -> list[Any]:
    return list(
        await asyncio.gather(
            *(validators.ask(offset + i, axon, f"v{offset + i}", args.timeout, message=QUESTION) for i in range(count))
        )
    )


def run_mode(mode: str, args: argparse.Namespace, upstream: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="openai-miner-outage-") as tmp:
        workdir = Path(tmp)
        flags = ["--logging.debug", *MODES[mode], *(["--fallback.device", args.device] if args.device else [])]
        miner = start_miner(workdir, upstream, args.model, flags, start_timeout=args.start_timeout)
        log = workdir / "miner.log"
        cases: dict[str, Any] = {}
        try:
            miner.start().wait_serving()
            wallet = bt.Wallet(name="miner", hotkey="default", path=str(workdir / "wallets"))
            axon = axon_info(miner.ports["axon"], wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)

            async def everything() -> None:
                validators = Validators()
                offset = 0
                try:
                    for count in sorted(set(args.validators)):
                        logged = log.stat().st_size
                        started = time.monotonic()
                        answers = await ask_all(validators, axon, count, args, offset)
                        wall = time.monotonic() - started
                        offset += count
                        await asyncio.sleep(0.5)  # the last answers' log lines
                        with log.open() as stream:
                            stream.seek(logged)
                            tokens = sum(int(found) for found in SENT.findall(stream.read()))
                        cases[str(count)] = {
                            "asked": count,
                            "answered_with_text": sum(a.ok for a in answers),
                            "first_chunk_s": first_chunk_s(answers),
                            "wall_s": round(wall, 2),
                            "local_tokens_per_s": round(tokens / wall, 1),
                            "example": next((a.text.strip() for a in answers if a.ok), ""),
                        }
                        print(f"  {mode:13} {count:3} validators: {cases[str(count)]['answered_with_text']}/{count} "
                              f"answered, first chunk p50 {cases[str(count)]['first_chunk_s']['p50']} s",
                              file=sys.stderr, flush=True)
                finally:
                    await validators.close()

            asyncio.run(everything())
        finally:
            miner.stop()
    return cases


def markdown(results: dict[str, Any]) -> str:
    meta, s = results["meta"], results["settings"]
    lines = [
        header(meta),
        "",
        f"Upstream answering HTTP 500 to everything; {s['timeout']:g} s timeout; model {s['model'] or 'the default'}.",
        "",
        "| validators | mode | answered with text | first chunk p50 / p99 (s) | local tokens/s |",
        "|---:|---|---:|---:|---:|",
    ]
    for count in map(str, s["validators"]):
        for mode, cases in results["modes"].items():
            c = cases[count]
            lines.append(
                f"| {count} | {mode} | {c['answered_with_text']}/{c['asked']} "
                f"| {c['first_chunk_s']['p50']} / {c['first_chunk_s']['p99']} | {c['local_tokens_per_s']} |"
            )
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__.splitlines()[0])
    parser.add_argument("--validators", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--timeout", type=float, default=20.0, help="each validator's timeout (s)")
    parser.add_argument("--device", default=None, help="--fallback.device (default: the miner's own)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    add_miner_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = Started("bench.outage", argv)
    with LoopbackUpstream(tokens=["never sent"], fault=Fault(status=500)) as upstream:
        modes = {mode: run_mode(mode, args, upstream.base_url) for mode in args.modes}
    results = {
        "meta": started.meta(),
        "settings": {
            "validators": sorted(set(args.validators)), "timeout": args.timeout, "model": args.model,
            "device": args.device,
        },
        "modes": modes,
    }
    save(args.out, "outage", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
