"""``python -m bench.hostile``: can hostile or broken clients starve the validators?

The real ``openai-miner --mock`` process serving both fronts, a key set and the local model
loaded, the loopback upstream (``--tokens`` words, ``--interval`` s apart), and two whitelisted
validators asking in turn, ``--asks`` times each, one through the axon (a real dendrite), one
through the HTTP front (signed, read as SSE), while one attack at a time runs in a process of its
own:

- ``quiet``: no attack, the reference of the same run;
- ``flood``: a stranger's signed requests, 50 at once, as fast as they go (its hotkey is on no
  chain: refused with 403, then, past ``--blacklist.max_refusals_per_second``, its address is
  cut off: connections closed unread);
- ``idle``: 1,100 connections per front that send nothing (past the 1,000 places of each), each
  reopened as soon as the miner closes it;
- ``idle, 30 addresses``: 5,000 such connections over both fronts, from 30 addresses;
- ``slow headers``: 50 connections per front sending a request's headers one byte a second,
  reopened likewise;
- ``junk``: connections sending bytes that are not HTTP, 200 a second over both fronts;
- ``100k messages``: a whitelisted validator asking through the axon, over and over, with
  100,000 one-character messages.

Then the local model, 6 validators asking at once (through the axon):

- ``stalled upstream``: the upstream takes every request and never sends a token;
- ``stalled upstream, a core busy``: the same, with a busy loop in another process;
- ``failing upstream``: the upstream answers every request with HTTP 500.

Figures per case: the validators' time to first chunk (p50, p99; from asking), per front too,
answers with text, the p50's ratio to quiet (per front), the miner's CPU seconds, and what the
attacker sent and got back. Writes ``<out>/hostile.json`` and ``<out>/hostile.md``.
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
import httpx

from bench import procstat
from bench.first_failure import add_miner_args, start_miner
from bench.record import Started, header, save
from bench.stats import first_chunk_s, median
from bench.validators import Validators, keypair, prompt
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.testing.localnet import axon_info, free_port, offline_ip
from openai_miner.testing.upstream import Fault, LoopbackUpstream
from openai_miner.testing.validator import Answer, ask, ask_http, signing_client

ATTACKS = ("flood", "idle", "idle, 30 addresses", "slow headers", "junk", "100k messages")
LOCAL_CASES = ("stalled upstream", "stalled upstream, a core busy", "failing upstream")
# Each attacker dials from its own loopback address, as it would from its own machine: the miner
# cuts off an address it refuses too often, and the validators' 127.0.0.1 must not share its fate.
ADDRESSES = {attack: f"127.0.0.{index}" for index, attack in enumerate(ATTACKS, start=2)}
SPREAD = [f"127.0.1.{index}" for index in range(1, 31)]  # the 30 addresses of "idle, 30 addresses"
FLOOD_AT_ONCE = 50
IDLE_SOCKETS = 1100  # per front: past its 1,000 places
SPREAD_SOCKETS = 5000  # over both fronts
SLOW_SOCKETS = 50  # per front
JUNK = b"\x16\x03\x01 junk\r\n\r\n"  # a TLS hello's first bytes, then nonsense
JUNK_PER_SECOND = 200
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


async def hold_open(slots: list[tuple[int, str]], stop: Any, slow: bool) -> dict[str, Any]:
    """A connection per (port, source address) in ``slots``, each reopened when the miner closes
    it. Each sends nothing at all or, when ``slow``, a request line and then a header that never
    ends, a byte a second."""
    closed = Counter[str]()

    async def one(port: int, address: str) -> None:
        while True:  # until cancelled, when the attack ends
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
            except OSError:
                closed["failed to connect"] += 1
                await asyncio.sleep(0.1)
                continue
            opened = time.monotonic()
            try:
                if slow:
                    writer.write(b"POST /StreamPromptingSynapse HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
                    while not await trickled(reader, writer):
                        pass
                else:
                    await reader.read()  # until the miner closes it
            except ConnectionError:
                pass
            finally:
                writer.close()
            closed["by the miner"] += 1
            closed["seconds open"] += time.monotonic() - opened

    tasks = [asyncio.ensure_future(one(port, address)) for port, address in slots]
    await until(stop)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    closes = closed["by the miner"]
    return {
        "connections": len(slots),
        "closed_by_the_miner": closes,
        "mean_seconds_open": round(closed["seconds open"] / closes, 1) if closes else None,
        "failed_to_connect": closed["failed to connect"],
    }


async def trickled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One more byte of a header that never ends, a second after the last; whether the miner closed."""
    try:
        return await asyncio.wait_for(reader.read(1024), 1.0) == b""
    except (TimeoutError, asyncio.TimeoutError):
        writer.write(b"a")
        return False


async def until(stop: Any) -> None:
    """Return once the multiprocessing event ``stop`` is set (polled, not blocking the loop)."""
    while not stop.is_set():
        await asyncio.sleep(0.1)


async def junk(ports: list[int], stop: Any) -> dict[str, Any]:
    """Connections sending bytes that are not HTTP, ``JUNK_PER_SECOND`` a second over ``ports``."""
    got: Counter[str] = Counter()

    async def one(port: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ADDRESSES["junk"], 0))
            writer.write(JUNK)
            head = await asyncio.wait_for(reader.readline(), 5.0)
            got[head.split()[1].decode() if head else "closed unread"] += 1
            writer.close()
        except (OSError, asyncio.TimeoutError) as error:
            got[type(error).__name__] += 1

    sent: list[asyncio.Task] = []
    while not stop.is_set():
        sent.append(asyncio.ensure_future(one(ports[len(sent) % len(ports)])))
        await asyncio.sleep(1 / JUNK_PER_SECOND)
    await asyncio.gather(*sent)
    return {"connections": len(sent), "got": dict(got)}


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


def attack(kind: str, ports: tuple[int, int], hotkey: str, coldkey: str, ready: Any, stop: Any, results: Any) -> None:
    """The attack process: once its imports are done it sets ``ready`` and runs ``kind`` until
    ``stop`` is set, then puts what it saw on ``results``. ``ports``: the axon's, the HTTP front's."""
    axon_port = ports[0]
    axon = axon_info(axon_port, hotkey, coldkey)
    runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "flood": lambda: flood(axon_port, axon, stop),
        "idle": lambda: hold_open([(port, ADDRESSES["idle"]) for port in ports for _ in range(IDLE_SOCKETS)], stop, False),
        "idle, 30 addresses": lambda: hold_open(
            [(ports[i % 2], SPREAD[i % len(SPREAD)]) for i in range(SPREAD_SOCKETS)], stop, False
        ),
        "slow headers": lambda: hold_open(
            [(port, ADDRESSES["slow headers"]) for port in ports for _ in range(SLOW_SOCKETS)], stop, True
        ),
        "junk": lambda: junk(list(ports), stop),
        "100k messages": lambda: many_messages(axon_port, axon, stop),
    }
    ready.set()
    results.put(asyncio.run(runs[kind]()))
    results.close()
    results.join_thread()  # the figures are in the pipe
    os._exit(0)  # skip the exit hooks: bittensor's log thread dies noisily when its queue closes


def busy(ready: Any, stop: Any) -> None:
    """A core kept busy by another program, until ``stop`` is set."""
    ready.set()
    while not stop.is_set():
        for _ in range(1_000_000):
            pass


# --- the validators ---


class Askers:
    """The validators: dendrites for the axon, signed httpx clients for the HTTP front."""

    def __init__(self, miner_hotkey: str) -> None:
        self.dendrites = Validators()
        self.miner_hotkey = miner_hotkey
        self.http: dict[int, httpx.AsyncClient] = {}

    async def ask(self, front: str, index: int, axon: bt.AxonInfo, http_port: int, marker: str, timeout: float) -> Answer:
        if front == "axon":
            answer = await self.dendrites.ask(index, axon, marker, timeout)
        else:
            if index not in self.http:
                self.http[index] = signing_client(keypair(f"validator-{index}"), self.miner_hotkey, timeout=timeout + 5)
            answer = await ask_http(self.http[index], http_port, prompt(marker), timeout, label=marker)
        answer.label = f"{front}:{marker}"
        return answer

    async def close(self) -> None:
        await self.dendrites.close()
        for client in self.http.values():
            await client.aclose()


async def ask_in_turn(askers: Askers, axon: bt.AxonInfo, http_port: int, asks: int, timeout: float) -> list[Answer]:
    """Two validators, one per front, each asking ``asks`` times, one question after another."""

    async def one(front: str, index: int) -> list[Answer]:
        return [await askers.ask(front, index, axon, http_port, f"v{index}-{n}", timeout) for n in range(asks)]

    first, second = await asyncio.gather(one("axon", 0), one("http", 1))
    return first + second


def figures(answers: list[Answer], upstreams: str) -> dict[str, Any]:
    fronts = sorted({answer.label.split(":")[0] for answer in answers})
    return {
        "asked": len(answers),
        "answered_with_text": sum(a.ok for a in answers),
        # from the local model: text, but not the upstream's
        "answered_locally": sum(a.ok and a.text != upstreams for a in answers),
        "first_chunk_s": first_chunk_s(answers),
        "by_front": {front: first_chunk_s(a for a in answers if a.label.startswith(front + ":")) for front in fronts},
        "last_first_chunk_s": max((a.first_chunk for a in answers if a.first_chunk is not None), default=None),
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
    http_port = free_port()
    flags = ["--http.port", str(http_port), *(["--fallback.device", args.device] if args.device else [])]
    context = multiprocessing.get_context("spawn")
    cases: dict[str, Any] = {}
    with LoopbackUpstream(tokens=answer, interval=args.interval) as upstream, tempfile.TemporaryDirectory(
        prefix="openai-miner-hostile-"
    ) as tmp:
        workdir = Path(tmp)
        miner = start_miner(workdir, upstream.base_url, args.model, flags, access, start_timeout=args.start_timeout)
        try:
            miner.start().wait_serving()
            port = miner.ports["axon"]
            loaded(workdir / "miner.log", args.start_timeout)
            wallet = bt.Wallet(name="miner", hotkey="default", path=str(workdir / "wallets"))
            hotkey, coldkey = wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address
            axon = axon_info(port, hotkey, coldkey)

            async def validators_during(kind: str) -> dict[str, Any]:
                askers = Askers(hotkey)
                ready, stop, results = context.Event(), context.Event(), context.Queue()
                attacker = None
                if kind != "quiet":
                    attacker = context.Process(
                        target=attack, args=(kind, (port, http_port), hotkey, coldkey, ready, stop, results)
                    )
                    attacker.start()
                    if not await asyncio.to_thread(ready.wait, 120):  # a fresh process: imports take seconds
                        raise RuntimeError(f"the {kind} attack did not start")
                    await asyncio.sleep(args.ramp)  # the attack is under way before anyone asks
                cpu, started = procstat.cpu_seconds(miner.pid), time.monotonic()
                try:
                    case = figures(await ask_in_turn(askers, axon, http_port, args.asks, args.timeout), upstreams)
                finally:
                    await askers.close()
                case["miner_cpu_s"] = round(procstat.cpu_seconds(miner.pid) - cpu, 2)
                if attacker is not None:
                    await asyncio.sleep(max(0.0, args.hold - args.ramp - (time.monotonic() - started)))
                    stop.set()
                    case["attack"] = await asyncio.to_thread(results.get, True, 120)
                    attacker.join(10)
                return case

            async def local(kind: str) -> dict[str, Any]:
                """6 validators at once while the upstream stalls or fails: the local model answers."""
                failing = kind == "failing upstream"
                upstream.fault = Fault(status=500) if failing else Fault(delay_before_headers=3600)
                ready, stop = context.Event(), context.Event()
                hog = context.Process(target=busy, args=(ready, stop)) if kind.endswith("a core busy") else None
                if hog is not None:
                    hog.start()
                    await asyncio.to_thread(ready.wait, 60)
                askers = Askers(hotkey)
                try:
                    answers = await asyncio.gather(
                        *(askers.ask("axon", i, axon, http_port, f"s{i}", args.local_timeout) for i in range(STALLED_VALIDATORS))
                    )
                finally:
                    await askers.close()
                    upstream.fault = None
                    stop.set()
                    if hog is not None:
                        hog.join(10)
                return figures(list(answers), upstreams)

            async def everything() -> None:
                warm = Askers(hotkey)  # the first answers of a fresh process are slower: not measured
                await asyncio.gather(
                    *(warm.ask(front, i, axon, http_port, f"warm-{i}", args.timeout) for i in range(4) for front in ("axon", "http"))
                )
                await warm.close()
                for kind in ("quiet", *ATTACKS):
                    cases[kind] = await validators_during(kind)
                    by = cases[kind]["by_front"]
                    print(f"  {kind:20} first chunk p50 axon {by['axon']['p50']} s, http {by['http']['p50']} s, "
                          f"{cases[kind]['answered_with_text']}/{cases[kind]['asked']} answered", file=sys.stderr)
                for kind in LOCAL_CASES:
                    cases[kind] = await local(kind)
                    print(f"  {kind:20} {cases[kind]['answered_locally']}/{cases[kind]['asked']} answered locally, "
                          f"last first chunk {cases[kind]['last_first_chunk_s']} s", file=sys.stderr)

            asyncio.run(everything())
        finally:
            miner.stop()
    quiet = cases["quiet"]["by_front"]
    for case in (cases[kind] for kind in ("quiet", *ATTACKS)):
        case["p50_over_quiet"] = {
            front: round(p50 / quiet[front]["p50"], 2) if p50 is not None and quiet[front]["p50"] else None
            for front, p50 in ((front, figures_["p50"]) for front, figures_ in case["by_front"].items())
        }
    return cases


BOUNDS = {"100k messages": 1.3}  # p50 ÷ quiet; 2 for the rest


def targets(cases: dict[str, Any], local_timeout: float) -> list[dict[str, Any]]:
    rows = []
    for kind in ATTACKS:
        bound, case = BOUNDS.get(kind, 2.0), cases[kind]
        for front, value in case["p50_over_quiet"].items():
            rows.append({
                "target": f"{front}: first chunk p50 under {kind} / quiet <= {bound:g}", "value": value,
                "met": value is not None and value <= bound,
            })
        rows.append({
            "target": f"{kind}: validators answered = {case['asked']}", "value": case["answered_with_text"],
            "met": case["answered_with_text"] == case["asked"],
        })
    least = {"stalled upstream": STALLED_VALIDATORS, "stalled upstream, a core busy": 5, "failing upstream": STALLED_VALIDATORS}
    for kind, wanted in least.items():
        rows.append({
            "target": f"{kind}: answered by the local model >= {wanted} of {cases[kind]['asked']}",
            "value": cases[kind]["answered_locally"], "met": cases[kind]["answered_locally"] >= wanted,
        })
    last = cases["failing upstream"]["last_first_chunk_s"]
    rows.append({
        "target": f"failing upstream: the last first chunk (s) <= half the {local_timeout:g} s timeout",
        "value": last, "met": last is not None and last <= local_timeout / 2,
    })
    return rows


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        header(results["meta"]),
        "",
        f"Upstream: {s['tokens']} words, one every {s['interval'] * 1000:g} ms; two whitelisted validators asking "
        f"{s['asks']} times each, one through the axon and one through the HTTP front, one question after another, "
        f"{s['timeout']:g} s timeout; model {s['model'] or 'the default'}. Each attack runs in its own process, from "
        f"{s['ramp']:g} s before the validators ask to at least {s['hold']:g} s; its figures cover all of it. Miner "
        f"CPU: while the validators ask. The local-model cases: {STALLED_VALIDATORS} validators at once through the "
        f"axon, {s['local_timeout']:g} s timeout.",
        "",
        "| case | validators answered (locally) | first chunk p50 axon / http (s) | p99, all (s) | p50 ÷ quiet axon / http | miner CPU (s) | the attacker |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for kind, c in results["cases"].items():
        attack = ", ".join(f"{k} {v}" for k, v in c.get("attack", {}).items())
        by, over = c["by_front"], c.get("p50_over_quiet", {})
        p50s = " / ".join(str(by[front]["p50"]) for front in ("axon", "http") if front in by)
        ratios = " / ".join(str(over[front]) for front in ("axon", "http") if front in over)
        lines.append(
            f"| {kind} | {c['answered_with_text']}/{c['asked']} ({c['answered_locally']}) | {p50s} | "
            f"{c['first_chunk_s']['p99']} | {ratios} | {c.get('miner_cpu_s', '')} | {attack} |"
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
    parser.add_argument(
        "--local-timeout", type=float, default=20.0, help="the validators' timeout (s) in the local-model cases"
    )
    parser.add_argument("--device", default=None, help="--fallback.device (default: the miner's own)")
    add_miner_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = Started("bench.hostile", argv)
    cases = run(args)
    names = ("asks", "tokens", "interval", "timeout", "local_timeout", "ramp", "hold", "model", "device")
    settings = {name: getattr(args, name) for name in names}
    results = {"meta": started.meta(), "settings": settings, "cases": cases, "targets": targets(cases, args.local_timeout)}
    save(args.out, "hostile", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
