"""``python -m bench.hostile``: can hostile or broken clients starve the validators?

The real ``openai-miner --mock`` process, a key set and the local model loaded, the loopback
upstream (``--tokens`` words, ``--interval`` s apart), and two whitelisted validators (real
dendrites) asking in turn, ``--asks`` times each, while one attack at a time runs in a process
of its own:

- ``quiet``: no attack, the reference of the same run;
- ``flood``: a stranger's signed requests, 50 at once, as fast as they go (its hotkey is on no
  chain: refused with 403, then, past ``--blacklist.max_refusals_per_second``, its address is
  cut off: connections closed unread);
- ``idle``: 300 connections that send nothing, each reopened as soon as the miner closes it;
- ``slow headers``: 100 connections sending a request's headers one byte a second, reopened
  likewise;
- ``100k messages``: a whitelisted validator asking, over and over, with 100,000 one-character
  messages;
- ``stalled upstream``: the upstream takes every request and never sends a token; 6 validators
  ask at once and should all get text from the local model.

Figures per case: the validators' time to first chunk (p50, p99; from asking), answers with text,
the p50's ratio to quiet, the miner's CPU seconds, and what the attacker sent and got back.
Writes ``<out>/hostile.json`` and ``<out>/hostile.md``.
"""

import argparse
import asyncio
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import aiohttp
import bittensor as bt

from bench import procstat
from bench.first_failure import add_miner_args, start_miner, wait_ready
from bench.record import Started, header, save
from bench.stats import first_chunk_s, median
from bench.validators import Validators, keypair
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.testing.localnet import axon_info, offline_ip
from openai_miner.testing.upstream import Fault, LoopbackUpstream
from openai_miner.testing.validator import Answer, ask

ATTACKS = ("flood", "idle", "slow headers", "100k messages")
# Each attacker dials from its own loopback address, as it would from its own machine: the miner
# cuts off an address it refuses too often, and the validators' 127.0.0.1 must not share its fate.
ADDRESSES = {attack: f"127.0.0.{index}" for index, attack in enumerate(ATTACKS, start=2)}
FLOOD_AT_ONCE = 50
IDLE_SOCKETS = 300
SLOW_SOCKETS = 100
MESSAGES = 100_000
STALLED_VALIDATORS = 6
SENDER = "sender"  # the whitelisted validator sending the 100,000 messages
LOADED = re.compile(r"\bloaded \S+ on \w+ \(")  # the local model's line once it is loaded


# --- the attacks, each in its own process until ``stop`` is set; each returns what it saw ---


async def flood(port: int, axon: bt.AxonInfo, stop: Any) -> dict[str, Any]:
    """Signed requests from a hotkey on no chain, ``FLOOD_AT_ONCE`` at a time, as fast as they go."""
    with offline_ip():
        stranger = bt.Dendrite(wallet=keypair("stranger"))
    synapse = StreamPromptingSynapse(roles=["user"], messages=["let me in"])
    signed = stranger.preprocess_synapse_for_request(axon, synapse, timeout=12.0)
    headers, body = signed.to_headers(), signed.model_dump()
    url = f"http://127.0.0.1:{port}/StreamPromptingSynapse"
    got: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=FLOOD_AT_ONCE, local_addr=(ADDRESSES["flood"], 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_after_another() -> None:
            while not stop.is_set():
                try:
                    async with session.post(url, headers=headers, json=body) as response:
                        await response.read()
                        got[str(response.status)] += 1
                except aiohttp.ClientError as error:
                    got[type(error).__name__] += 1

        await asyncio.gather(*(one_after_another() for _ in range(FLOOD_AT_ONCE)))
    return {"requests": sum(got.values()), "got": dict(got)}


async def hold_open(port: int, count: int, stop: Any, slow: bool, address: str) -> dict[str, Any]:
    """``count`` connections kept open, each reopened when the miner closes it. Each sends nothing
    at all or, when ``slow``, a request line and then a header that never ends, a byte a second."""
    closed = Counter[str]()

    async def one() -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
            opened = time.monotonic()
            if slow:
                writer.write(b"POST /StreamPromptingSynapse HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
            while not stop.is_set():
                if slow:
                    writer.write(b"a")
                try:
                    if not await asyncio.wait_for(reader.read(1024), 1.0):
                        closed["by the miner"] += 1
                        closed["seconds open"] += round(time.monotonic() - opened)
                        break
                except (TimeoutError, asyncio.TimeoutError):
                    continue
                except ConnectionError:
                    closed["by the miner"] += 1
                    break
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    closes = closed["by the miner"]
    return {
        "connections": count,
        "closed_by_the_miner": closes,
        "mean_seconds_open": round(closed["seconds open"] / closes, 1) if closes else None,
    }


async def many_messages(port: int, axon: bt.AxonInfo, stop: Any) -> dict[str, Any]:
    """A whitelisted validator asking with ``MESSAGES`` one-character messages, over and over."""
    with offline_ip():
        sender = bt.Dendrite(wallet=keypair(SENDER))
    sender.external_ip = "bench-sender"
    sender._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ADDRESSES["100k messages"], 0)))
    got: Counter[str] = Counter()
    times: list[float] = []
    try:
        while not stop.is_set():
            answer = await ask(sender, axon, ["user"] * MESSAGES, ["x"] * MESSAGES, timeout=12.0)
            got[str(answer.status) if answer.error is None else answer.error.split(":")[0]] += 1
            times.append(answer.ended - answer.started)
    finally:
        await sender.aclose_session()
    each = median(times)
    return {"requests": sum(got.values()), "got": dict(got), "seconds_each_p50": None if each is None else round(each, 3)}


def attack(kind: str, port: int, hotkey: str, coldkey: str, ready: Any, stop: Any, results: Any) -> None:
    """The attack process: once its imports are done it sets ``ready`` and runs ``kind`` until
    ``stop`` is set, then puts what it saw on ``results``."""
    axon = axon_info(port, hotkey, coldkey)
    runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "flood": lambda: flood(port, axon, stop),
        "idle": lambda: hold_open(port, IDLE_SOCKETS, stop, slow=False, address=ADDRESSES["idle"]),
        "slow headers": lambda: hold_open(port, SLOW_SOCKETS, stop, slow=True, address=ADDRESSES["slow headers"]),
        "100k messages": lambda: many_messages(port, axon, stop),
    }
    ready.set()
    results.put(asyncio.run(runs[kind]()))
    results.close()
    results.join_thread()  # the figures are in the pipe
    os._exit(0)  # skip the exit hooks: bittensor's log thread dies noisily when its queue closes


# --- the validators ---


async def ask_in_turn(validators: Validators, axon: bt.AxonInfo, asks: int, timeout: float) -> list[Answer]:
    """Two validators, each asking ``asks`` times, one question after another."""

    async def one(index: int) -> list[Answer]:
        return [await validators.ask(index, axon, f"v{index}-{n}", timeout) for n in range(asks)]

    first, second = await asyncio.gather(one(0), one(1))
    return first + second


def figures(answers: list[Answer], upstreams: str) -> dict[str, Any]:
    return {
        "asked": len(answers),
        "answered_with_text": sum(a.ok for a in answers),
        # from the local model: text, but not the upstream's
        "answered_locally": sum(a.ok and a.text != upstreams for a in answers),
        "first_chunk_s": first_chunk_s(answers),
        "errors": Counter(a.error or f"HTTP {a.status}" for a in answers if not a.ok).most_common(3),
    }


def loaded(log: Path, timeout: float) -> None:
    """Wait for the local model: with a key set it loads in the background while the miner serves,
    and its load's CPU would weigh on the first case."""
    end = time.monotonic() + timeout
    while not LOADED.search(log.read_text()):
        if time.monotonic() > end:
            raise RuntimeError(f"the local model did not load within {timeout:g}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    answer = [f"t{i} " for i in range(args.tokens)]
    upstreams = "".join(answer)
    whitelist = [keypair(f"validator-{i}").ss58_address for i in range(STALLED_VALIDATORS)]
    access = ["--blacklist.whitelist", *whitelist, keypair(SENDER).ss58_address]
    flags = ["--fallback.device", args.device] if args.device else []
    context = multiprocessing.get_context("spawn")
    cases: dict[str, Any] = {}
    with LoopbackUpstream(tokens=answer, interval=args.interval) as upstream, tempfile.TemporaryDirectory(
        prefix="openai-miner-hostile-"
    ) as tmp:
        workdir = Path(tmp)
        process, port = start_miner(workdir, upstream.base_url, args.model, flags, access)
        try:
            wait_ready(process, workdir / "miner.log", args.start_timeout)
            loaded(workdir / "miner.log", args.start_timeout)
            wallet = bt.Wallet(name="miner", hotkey="default", path=str(workdir / "wallets"))
            hotkey, coldkey = wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address
            axon = axon_info(port, hotkey, coldkey)

            async def validators_during(kind: str) -> dict[str, Any]:
                validators = Validators()
                ready, stop, results = context.Event(), context.Event(), context.Queue()
                attacker = None
                if kind != "quiet":
                    attacker = context.Process(target=attack, args=(kind, port, hotkey, coldkey, ready, stop, results))
                    attacker.start()
                    if not await asyncio.to_thread(ready.wait, 120):  # a fresh process: imports take seconds
                        raise RuntimeError(f"the {kind} attack did not start")
                    await asyncio.sleep(args.ramp)  # the attack is under way before anyone asks
                cpu, started = procstat.cpu_seconds(process.pid), time.monotonic()
                try:
                    case = figures(await ask_in_turn(validators, axon, args.asks, args.timeout), upstreams)
                finally:
                    await validators.close()
                case["miner_cpu_s"] = round(procstat.cpu_seconds(process.pid) - cpu, 2)
                if attacker is not None:
                    await asyncio.sleep(max(0.0, args.hold - args.ramp - (time.monotonic() - started)))
                    stop.set()
                    case["attack"] = await asyncio.to_thread(results.get, True, 60)
                    attacker.join(10)
                return case

            async def stalled() -> dict[str, Any]:
                upstream.fault = Fault(delay_before_headers=3600)  # takes the request, never answers
                validators = Validators()
                try:
                    answers = await asyncio.gather(
                        *(validators.ask(i, axon, f"s{i}", args.timeout) for i in range(STALLED_VALIDATORS))
                    )
                finally:
                    await validators.close()
                    upstream.fault = None
                return figures(list(answers), upstreams)

            async def everything() -> None:
                warm = Validators()  # the first answers of a fresh process are slower: not measured
                await asyncio.gather(*(warm.ask(i, axon, f"warm-{i}", args.timeout) for i in range(4)))
                await warm.close()
                for kind in ("quiet", *ATTACKS):
                    cases[kind] = await validators_during(kind)
                    print(f"  {kind:16} first chunk p50 {cases[kind]['first_chunk_s']['p50']} s, "
                          f"{cases[kind]['answered_with_text']}/{cases[kind]['asked']} answered", file=sys.stderr)
                cases["stalled upstream"] = await stalled()

            asyncio.run(everything())
        finally:
            procstat.stop(process)
    quiet = cases["quiet"]["first_chunk_s"]["p50"]
    for case in (cases[kind] for kind in ("quiet", *ATTACKS)):
        p50 = case["first_chunk_s"]["p50"]
        case["p50_over_quiet"] = round(p50 / quiet, 2) if p50 is not None and quiet else None
    return cases


def targets(cases: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"target": f"first chunk p50 under {kind} / quiet <= 2", "value": cases[kind]["p50_over_quiet"]}
        for kind in ATTACKS
    ]
    for row in rows:
        row["met"] = row["value"] is not None and row["value"] <= 2
    stall = cases["stalled upstream"]
    rows.append({
        "target": f"stalled upstream: answered by the local model = {stall['asked']}",
        "value": stall["answered_locally"],
        "met": stall["answered_locally"] == stall["asked"],
    })
    return rows


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        header(results["meta"]),
        "",
        f"Upstream: {s['tokens']} words, one every {s['interval'] * 1000:g} ms; two whitelisted validators asking "
        f"{s['asks']} times each, one question after another, {s['timeout']:g} s timeout; model "
        f"{s['model'] or 'the default'}. Each attack runs in its own process, from {s['ramp']:g} s before the "
        f"validators ask to at least {s['hold']:g} s; its figures cover all of it. Miner CPU: while the validators ask.",
        "",
        "| case | validators answered | first chunk p50 / p99 (s) | p50 ÷ quiet | miner CPU (s) | the attacker |",
        "|---|---:|---|---:|---:|---|",
    ]
    for kind, c in results["cases"].items():
        attack = ", ".join(f"{k} {v}" for k, v in c.get("attack", {}).items())
        lines.append(
            f"| {kind} | {c['answered_with_text']}/{c['asked']} | {c['first_chunk_s']['p50']} / "
            f"{c['first_chunk_s']['p99']} | {c.get('p50_over_quiet', '')} | {c.get('miner_cpu_s', '')} | {attack} |"
        )
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=40, help="questions per validator and case")
    parser.add_argument("--tokens", type=int, default=30, help="words in the upstream's answer")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between the upstream's words")
    parser.add_argument("--timeout", type=float, default=12.0, help="each validator's timeout (s)")
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds an attack runs before the validators ask")
    parser.add_argument(
        "--hold", type=float, default=25.0,
        help="seconds each attack runs at least (past the miner's 20 s idle limit, so that its closing shows)",
    )
    parser.add_argument("--device", default=None, help="--fallback.device (default: the miner's own)")
    add_miner_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = Started("bench.hostile", argv)
    cases = run(args)
    settings = {k: getattr(args, k) for k in ("asks", "tokens", "interval", "timeout", "ramp", "hold", "model", "device")}
    results = {"meta": started.meta(), "settings": settings, "cases": cases, "targets": targets(cases)}
    save(args.out, "hostile", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
