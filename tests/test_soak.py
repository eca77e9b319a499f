"""Soak: many mixed requests, 16 at a time, with random upstream faults, hang-ups and bad input.

Zero crashes, zero hung streams, every answer well-formed and from one model only, and nothing
left behind: no asyncio task on the axon's loop, no thread, no open upstream request, no upstream
stream left for the garbage collector to close, no running generation, flat memory. CI runs 300
requests; ``SOAK_REQUESTS=5000 pytest tests/test_soak.py -s`` is the long run by hand
(``SOAK_SEED`` picks another mix).
"""

import asyncio
import gc
import logging
import os
import random
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import bittensor as bt
import pytest

from openai_miner.testing.upstream import Fault, LoopbackUpstream, RecordedRequest
from openai_miner.miner import OpenAIMiner
from openai_miner.testing.validator import Answer, ask
from tests.helpers import FULL, TOKENS, eventually, is_local, is_upstream_prefix, local_flags, collector_paused, local_generating, leftovers

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "300"))
SEED = int(os.environ.get("SOAK_SEED", "6"))
CONCURRENCY = 16

# kind -> (weight, the upstream's fault for it)
KINDS: dict[str, tuple[int, Fault | None]] = {
    "ok": (30, None),
    "slow": (4, Fault(interval=0.3)),
    "no-done": (3, Fault(no_done=True)),
    "stall": (2, Fault(delay_before_headers=60)),
    "429": (4, Fault(status=429, retry_after=0.2)),
    "500": (4, Fault(status=500)),
    "400": (4, Fault(status=400)),
    "empty": (3, None),
    "drop": (5, Fault(drop_after=3)),
    "malformed": (4, Fault(malformed_after=3)),
    "hang-up": (10, Fault(interval=0.05)),
    "bad-input": (5, None),
}


@dataclass
class Outcome:
    index: int
    kind: str
    timeout: float
    answer: Answer | None = None  # None: the validator hung up first...
    hung_up_at: float | None = None  # ...at this time.monotonic()
    error: str | None = None  # the validator's call raised, or never returned


def upstream_fault(body: dict[str, Any]) -> Fault | None:
    return KINDS[kind_of(body)][1]


def upstream_tokens(body: dict[str, Any]) -> list[str]:
    return [] if kind_of(body) == "empty" else TOKENS


def kind_of(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"]).split()[0]


def plan(count: int, rng: random.Random) -> list[tuple[str, float, float]]:
    """(kind, validator timeout, seconds before a hang-up) for each request."""
    names = list(KINDS)
    weights = [KINDS[name][0] for name in names]
    return [
        (kind, rng.choice([2.0, 3.0, 4.0]), rng.uniform(0.05, 0.6))  # the miner's margin is 0.5 s for all
        for kind in rng.choices(names, weights, k=count)
    ]


async def one(
    dendrite: bt.Dendrite, miner: OpenAIMiner, index: str, kind: str, timeout: float, hang_up: float
) -> Outcome:
    outcome = Outcome(index, kind, timeout)
    roles, messages = (["user", "assistant"], ["no answer"]) if kind == "bad-input" else (["user"], [f"{kind} {index}"])
    call = ask(dendrite, miner.axon, roles, messages, timeout=timeout)
    try:
        if kind == "hang-up":
            outcome.answer = await asyncio.wait_for(call, hang_up)
        else:
            outcome.answer = await asyncio.wait_for(call, timeout + 5)  # far past any clean end
    except asyncio.TimeoutError:
        if kind == "hang-up":
            outcome.hung_up_at = time.monotonic()
        else:
            outcome.error = "hung: no end of stream"
    except Exception as error:  # the validator must never see one
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome


def problems(outcome: Outcome, record: RecordedRequest | None) -> list[str]:
    """What is wrong with one answer, given what the upstream saw of it (None: not asked).

    Under load an answer may be cut by the miner's deadline: shorter than expected is right
    only if the stream lasted until that deadline. Lateness is the validator's own verdict (408).
    """
    if outcome.error:
        return [outcome.error]
    answer = outcome.answer
    if answer is None:  # hung up: the upstream request, if any, must close at once
        late = record is not None and not record.finished and record.ended_at - outcome.hung_up_at > 1.0
        return [f"upstream closed {record.ended_at - outcome.hung_up_at:.2f}s after the hang-up"] if late else []
    text, kind = answer.text, outcome.kind
    if kind == "bad-input":
        return [] if answer.status == 400 and text == "" else [f"bad input got {answer.status} {text!r}"]
    found = []
    if answer.status != 200 or answer.synapse.completion != text:
        found.append(f"status {answer.status}: {answer.synapse.dendrite.status_message}")
    if not (is_upstream_prefix(text) or is_local(text)):
        found.append(f"mixed or foreign text {text!r}")
    if record is None or kind == "hang-up":
        return found  # skipped by the open circuit breaker: local or nothing, checked above
    full = {"ok": FULL, "no-done": FULL, "slow": FULL, "drop": "".join(TOKENS[:3]), "malformed": "".join(TOKENS[:3])}
    if kind == "stall":  # no first token within half the time left: the local model answers
        expected = text == "" or is_local(text)
    elif kind in full:
        cut = answer.ended - answer.started >= outcome.timeout - min(0.5, outcome.timeout / 4) - 0.05
        expected = text == full[kind] or (cut and full[kind].startswith(text))
    else:  # failed before the first token: local or nothing
        expected = text == "" or is_local(text)
    return found if expected else [*found, f"{kind} answered {text!r} in {answer.ended - answer.started:.2f}s"]


class Errors(logging.Handler):
    """Collects ERROR records that mean a crash: the axon's ASGI errors, lost asyncio exceptions."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def crashes_logged() -> Iterator[Errors]:
    """Listen where crashes are logged; uvicorn (started by the axon) and bittensor silence both."""
    handler = Errors()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio")]
    saved = [(logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.ERROR)
        logger.disabled = False
    try:
        yield handler
    finally:
        for logger, (level, disabled) in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.disabled = disabled


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Keep the miner's thousands of warnings out of pytest's in-memory log capture.

    They still go through bittensor's own handlers; kept by pytest they would grow the memory
    this test measures.
    """
    logger = logging.getLogger("bittensor")
    saved, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = saved


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def axon_tasks(miner: OpenAIMiner) -> int:
    """Tasks alive on the axon's event loop (uvicorn's own included), counted on that loop."""
    loop = miner.axon.fast_server.servers[0].get_loop()

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=5)


async def run_batch(
    dendrites: list[bt.Dendrite], miner: OpenAIMiner, up: LoopbackUpstream, jobs: list[tuple[str, str, float, float]]
) -> tuple[list[str], Counter[str]]:
    """``jobs`` through ``len(dendrites)`` validators, each asking one request at a time.

    Returns each problem and counts of what happened; answers and upstream records are dropped
    after being checked, so the test's memory does not grow with the number of requests.
    """
    queue = list(reversed(jobs))
    outcomes: list[Outcome] = []

    async def validator_loop(dendrite: bt.Dendrite) -> None:
        while queue:
            index, kind, timeout, hang_up = queue.pop()
            outcomes.append(await one(dendrite, miner, index, kind, timeout, hang_up))

    await asyncio.gather(*(validator_loop(dendrite) for dendrite in dendrites))
    await eventually(lambda: all(r.ended_at is not None for r in up.requests), within=3.0)
    records = {str(r.body["messages"][-1]["content"]): r for r in up.requests}
    found = [
        f"{o.kind} #{o.index} ({o.timeout:g}s): {issue}"
        for o in outcomes
        for issue in problems(o, records.get(f"{o.kind} {o.index}"))
    ]
    counts = Counter(o.kind for o in outcomes)
    counts["upstream requests"] = len(up.requests)
    counts["hung up"] = sum(o.kind == "hang-up" and o.answer is None for o in outcomes)
    up.requests.clear()  # all ended: the server appends no more to them
    for dendrite in dendrites:
        dendrite.synapse_history.clear()  # a bt.Dendrite keeps every synapse it sent
    return found, counts


@pytest.mark.slow  # 16 validators, hundreds of requests: tens of seconds
async def test_soak(serve_miner, validator, tiny_model) -> None:
    rng = random.Random(SEED)
    with LoopbackUpstream(tokens=upstream_tokens, interval=0.01, fault=upstream_fault) as up:
        miner = serve_miner(
            "--openai.base_url", up.base_url, "--neuron.streaming_batch_size", "4",
            "--blacklist.max_requests_per_minute", "0",  # one validator hotkey asks for all 16
            *local_flags(tiny_model, "--fallback.max_batch", "2", "--fallback.cooldown", "0.5"),
        )
        dendrites = [bt.Dendrite(wallet=validator) for _ in range(CONCURRENCY)]
        with crashes_logged() as crash_log, quiet_warnings():
            warm_up = [(f"w{i}", kind, 2.0, 0.2) for i, kind in enumerate(KINDS)] * 2
            await run_batch(dendrites, miner, up, warm_up)  # pools, lazy imports, caches
            # the warm-up's answers all ended (the local batch empty) before the baseline is read
            await eventually(lambda: local_generating(miner) == 0, within=3.0)
            gc.collect()
            threads, tasks, memory = threading.active_count(), axon_tasks(miner), [rss_mb()]
            started = time.monotonic()
            jobs = [(str(i), *job) for i, job in enumerate(plan(REQUESTS, rng))]
            found: list[str] = []
            counts: Counter[str] = Counter()
            step = max(REQUESTS // 5, CONCURRENCY)
            with collector_paused():  # what an answer leaves to the collector is counted after each batch
                for first in range(0, REQUESTS, step):
                    batch_found, batch_counts = await run_batch(dendrites, miner, up, jobs[first : first + step])
                    found += batch_found + [f"left to the collector: {name}" for name in await leftovers()]
                    counts += batch_counts
                    gc.collect()
                    memory.append(rss_mb())
            took = time.monotonic() - started
            await asyncio.sleep(miner.config.fallback.cooldown)
            after = await ask(dendrites[0], miner.axon, ["user"], ["ok after"], timeout=3.0)
            for dendrite in dendrites:
                await dendrite.aclose_session()
            await eventually(lambda: local_generating(miner) == 0, within=3.0)
            await eventually(lambda: axon_tasks(miner) <= tasks, within=3.0)
        open_upstream = len(up._handlers)
    gc.collect()
    leaked_threads = threading.active_count() - threads
    answered = sum(counts[kind] for kind in KINDS)
    print(
        f"\nsoak: {answered} requests in {took:.1f}s, {CONCURRENCY} at a time, answered by "
        f"{dict(miner.core.stats.by_source('complete'))}; {dict(counts)}"
        f"\nleaks: {leaked_threads} threads, {axon_tasks(miner) - tasks} axon tasks, {open_upstream} open "
        f"upstream requests; RSS MB {' '.join(f'{m:.0f}' for m in memory)}; {len(found)} problems"
    )
    assert answered == REQUESTS
    assert not found, found[:30]
    assert not crash_log.records, [r.getMessage()[:300] for r in crash_log.records[:5]]
    assert after.status == 200 and after.text == FULL  # still serving, from the upstream again
    assert open_upstream == 0 and leaked_threads <= 0
    assert memory[-1] - memory[0] < 32 and memory[-1] - memory[1] < 16, memory  # flat after the first fifth
