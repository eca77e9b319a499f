"""The run's log written to a file or a pipe: no colour codes, one stream, whole lines."""

import io
import logging
import re
import threading
from pathlib import Path

import bittensor as bt

from openai_miner import logs
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
