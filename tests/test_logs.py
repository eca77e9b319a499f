"""The run's log written to a file or a pipe: no colour codes, one stream, whole lines; one line
per answer and a summary line a minute."""

import io
import logging
import re
import threading
import time
from pathlib import Path
from typing import Sequence

import bittensor as bt
import pytest

from openai_miner import logs
from openai_miner.access import Access, AccessPolicy, RateLimiter, RecentPrompts, Refusals
from openai_miner.chain import Neuron, Registry
from openai_miner.core import Core, Question
from openai_miner.streaming import Outcome, Piece, StreamResult
from openai_miner.system_prompts import SystemPrompts
from openai_miner.tally import Tally, percentile
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing import (
    OPEN_TO_ALL,
    LoopbackUpstream,
    MinerProcess,
    ask_http,
    free_port,
    make_wallet,
    miner_argv,
    miner_env,
    signing_client,
)
from tests.helpers import far

SUMMARY_LINE = re.compile(r"^openai-miner \| network mock \| netuid 1 \| hotkey \w+ \| .* \| batch \d+ tokens$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_under_no_color() -> None:
    assert logs.wants_colour(Terminal(), {})
    assert not logs.wants_colour(io.StringIO(), {})  # a file, a pipe
    assert not logs.wants_colour(Terminal(), {"NO_COLOR": "1"})
    assert logs.wants_colour(Terminal(), {"NO_COLOR": ""})  # no-color.org: set and not empty


def test_the_plain_format_is_bittensors_without_escape_codes() -> None:
    record = logging.LogRecord("bittensor", logging.WARNING, __file__, 1, "[red]careful[/red]", None, None)
    text = logs.PlainFormatter().format(record)
    assert "\x1b[" not in text and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| +WARNING +\| careful", text)


def test_said_lines_never_merge_with_lines_logged_meanwhile() -> None:
    handler, sink = logs.stream_handler(), io.StringIO()
    previous = handler.setStream(sink)
    started = threading.Event()

    def log_many() -> None:
        started.set()
        for n in range(300):
            bt.logging.warning(f"logged {n}")

    try:
        thread = threading.Thread(target=log_many)
        thread.start()
        started.wait()
        for n in range(300):
            logs.say(f"said {n}")
        thread.join()
        bt.logging._listener.stop()  # writes out every record still queued, then carries on
        bt.logging._listener.start()
    finally:
        handler.setStream(previous)
    lines = sink.getvalue().splitlines()
    said = [line for line in lines if "said" in line]
    assert said == [f"said {n}" for n in range(300)]
    assert sum(line.endswith(tuple(f"logged {n}" for n in range(300))) for line in lines) == 300


@pytest.mark.slow  # the real command
async def test_the_real_command_logs_to_a_pipe_without_colour_and_its_summary_on_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    wallets, http_port = tmp_path / "wallets", free_port()
    validator = make_wallet(wallets, "validator")
    make_wallet(wallets, "miner")
    with LoopbackUpstream(tokens=["one", " answer"]) as upstream:
        argv = miner_argv(
            wallets, free_port(), "--axon.off", "--http.port", str(http_port),
            "--openai.base_url", upstream.base_url, "--fallback.off", *OPEN_TO_ALL,
        )
        with MinerProcess(argv, env=miner_env(tmp_path), cwd=tmp_path) as process:
            async with signing_client(validator.hotkey, process.hotkey) as client:
                for _ in range(3):
                    assert (await ask_http(client, http_port, "hello")).status == 200
    log = process.log
    assert process.returncode == 0, log
    assert "\x1b[" not in log, log[:2000]
    assert "Info enabled." not in log and "Enabling info logging." not in log
    lines = log.splitlines()
    assert sum(bool(SUMMARY_LINE.match(line)) for line in lines) == 1, log[-3000:]
    assert "openai-miner: stopped after 3 answers (6 tokens)" in lines
    answered = f"| http {validator.hotkey.ss58_address[:10]}: 2 tokens in 1 chunks via openai (complete), first chunk "
    assert sum(answered in line for line in lines) == 3, log[-3000:]  # at the default level: one line per answer


def answering_core(source: FakeSource, **kwargs) -> Core:
    registry = Registry.of([Neuron(uid=0, hotkey="validator-hotkey", stake=10.0, validator_permit=True)])
    access = Access(AccessPolicy(), registry, RateLimiter(600), RecentPrompts(0.0))
    return Core(source, access, SystemPrompts({"generic": "Be brief."}), batch_size=2, **kwargs)


async def ignore(batch: Sequence[Piece]) -> None:
    pass


async def test_each_answer_is_one_info_line_with_its_front_caller_source_and_first_chunk(caplog) -> None:
    answering = answering_core(FakeSource(["a", "b", "c"]))
    asked = answering.question("validator-hotkey", ["user"], ["a secret prompt"], None, timeout=10, arrived=time.monotonic(), front="http")
    with caplog.at_level("INFO", logger="bittensor"):
        result = await answering.answer(asked, ignore)
    lines = [record for record in caplog.records if "tokens in" in record.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    line = lines[0].getMessage()
    assert re.fullmatch(
        r"http validator-: 3 tokens in 2 chunks via fake \(complete\), first chunk \d+\.\d\ds, \d+\.\d\ds", line
    ), line
    assert "secret" not in line and result.first_chunk is not None and result.first_chunk >= 0


async def test_no_log_answers_puts_the_line_at_debug_and_an_empty_answer_has_no_first_chunk(caplog) -> None:
    answering = answering_core(FakeSource([]), log_answers=False)
    with caplog.at_level("DEBUG", logger="bittensor"):
        result = await answering.answer(Question(answering.chat(["user"], ["hi"], None), far()), ignore)
    lines = [record for record in caplog.records if "tokens in" in record.getMessage()]
    assert [record.levelno for record in lines] == [logging.DEBUG] and result.first_chunk is None
    assert "first chunk -," in lines[0].getMessage()


def result(source: str, outcome: Outcome = "complete", tokens: int = 10, first_chunk: float | None = 0.1) -> StreamResult:
    return StreamResult(outcome, tokens, 1, source, first_chunk=first_chunk)


def test_the_summary_line_comes_once_a_window_is_over_with_outcomes_sources_rates_and_percentiles(caplog) -> None:
    now = [0.0]
    tally = Tally(every=60, fallback="local", clock=lambda: now[0])
    with caplog.at_level("INFO", logger="bittensor"):
        for n in range(1, 20):
            tally.count(result("openai", first_chunk=n / 100), duration=0.5)
        tally.count(result("local", "deadline", first_chunk=None), duration=0.5)
        assert not [record for record in caplog.records if "answered" in record.getMessage()]  # not yet a minute
        now[0] = 61.0
        tally.count(result("openai", first_chunk=0.2), duration=1.5)
        now[0] = 200.0  # a quiet window: nothing to say until an answer comes
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("answered")]
    assert lines == [
        "answered 21 in 61s: complete 20, deadline 1 | openai 20, local 1 (fallback 5%) | "
        "210 tokens, 18 tokens/s an answer | first chunk p50 0.10s p95 0.19s"
    ]


def test_percentile_is_the_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0], 0.95) == 1.0
    assert percentile([float(n) for n in range(1, 101)], 0.95) == 95.0


def test_the_summary_line_gives_the_refusals_of_its_window_by_reason(caplog) -> None:
    now, refusals = [0.0], Refusals(every=1e9)
    refusals.count("hotkey 5DAAnrj7VHTznn2AWBemMuyBwZWs6FNFjdyVXUeYum3PTXFy is not registered on this subnet")  # before the window: not in its line
    tally = Tally(every=60, clock=lambda: now[0], refusals=lambda: refusals.totals)
    for reason in ["hotkey 5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX is not registered on this subnet"] * 2 + ["more than 60 requests in a minute from this hotkey"]:
        refusals.count(reason)
    with caplog.at_level("INFO", logger="bittensor"):
        now[0] = 61.0
        tally.count(result("openai"), duration=1.0)
        now[0] = 122.0  # a window without refusals says nothing of them
        tally.count(result("openai"), duration=1.0)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("answered")]
    assert len(lines) == 2
    assert lines[0].endswith(
        " | refused 3: hotkey * is not registered on this subnet 2, more than * requests in a minute from this hotkey 1"
    ), lines[0]
    assert "refused" not in lines[1]


async def test_the_core_s_summary_line_counts_what_its_fronts_refused(caplog) -> None:
    answering = answering_core(FakeSource(["a", "b"]))
    answering.tally.every = 0  # every answer ends a window
    answering.access.refused("10.0.0.1", "hotkey 5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX is not registered on this subnet")
    with caplog.at_level("INFO", logger="bittensor"):
        await answering.answer(Question(answering.chat(["user"], ["hi"], None), far()), ignore)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("answered")]
    assert len(lines) == 1 and lines[0].endswith(" | refused 1: hotkey * is not registered on this subnet 1"), lines
