"""The upstream's daily token budget: counted from the upstream's usage, kept in a file across
restarts (a corrupt one is a fresh day), the local model answering once it is spent, a 503 on
every front without one; and ``--openai.max_tokens`` capping what a request may ask for."""

import json
import logging
from datetime import date, timedelta
from pathlib import Path

import bittensor as bt
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from openai_miner import cli
from openai_miner.budget import STATE_FILE, DailyBudget
from openai_miner.messages import Message
from openai_miner.sources.base import DEFAULT_SAMPLING, Closed, Sampling
from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.streaming import stream_answer
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.localnet import free_port
from openai_miner.testing.loosh import LooshValidator
from openai_miner.testing.upstream import LoopbackUpstream
from openai_miner.testing.validator import ask, ask_http, signing_client
from tests.helpers import Recorder, far

WORDS = [f"w{i} " for i in range(10)]
MESSAGES = [Message("user", "two words")]
COST = 2 + len(WORDS)  # the loopback server's usage: a prompt token per word, a completion token per token


class Calendar:
    def __init__(self) -> None:
        self.day = date(2026, 12, 4)

    def __call__(self) -> date:
        return self.day


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="bittensor")
    return caplog


# -- the budget itself -----------------------------------------------------------------------------


def test_it_trips_once_and_resets_on_the_next_utc_day(tmp_path: Path, logged) -> None:
    calendar = Calendar()
    budget = DailyBudget(100, tmp_path / STATE_FILE, today=calendar)
    budget.charge(60)
    assert not budget.exhausted() and budget.reading() == (60, 100)
    budget.charge(60)
    assert budget.exhausted() and budget.exhausted() and budget.reading() == (120, 100)
    tripped = [line for line in warnings(logged) if "budget is spent" in line]
    assert len(tripped) == 1 and "120 of 100 tokens" in tripped[0]
    calendar.day += timedelta(days=1)
    assert not budget.exhausted() and budget.spent == 0
    assert sum("available again" in line for line in warnings(logged)) == 1
    assert json.loads((tmp_path / STATE_FILE).read_text())["day"] == "2026-12-05"


def test_the_budget_is_spent_at_its_limit_not_one_token_before() -> None:
    budget = DailyBudget(100, today=Calendar())
    budget.charge(99)
    assert not budget.exhausted()
    budget.charge(1)
    assert budget.exhausted() and budget.reading() == (100, 100)


def test_the_day_s_total_survives_a_restart_but_not_the_day(tmp_path: Path) -> None:
    calendar, path = Calendar(), tmp_path / "state" / STATE_FILE
    DailyBudget(1000, path, today=calendar).charge(420)
    assert DailyBudget(1000, path, today=calendar).spent == 420
    calendar.day += timedelta(days=1)
    assert DailyBudget(1000, path, today=calendar).spent == 0


def test_each_change_replaces_the_file_whole(tmp_path: Path) -> None:
    budget = DailyBudget(10_000, tmp_path / STATE_FILE, today=Calendar())
    for _ in range(50):
        budget.charge(7)
    assert [path.name for path in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"day": "2026-12-04", "spent": 350, "limit": 10_000}


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"\xff\xfe", b"[]", b'{"day": "2026-12-04"}', b'{"day": "yesterday", "spent": 5}',
    b'{"day": "2026-12-04", "spent": -5}', b'{"day": "2026-12-04", "spent": "5"}', b'{"day": "2026-12-04", "spent": true}',
])
def test_a_corrupt_file_is_reported_and_the_day_starts_afresh(tmp_path: Path, logged, content: bytes) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(content)
    budget = DailyBudget(100, path, today=Calendar())
    assert budget.spent == 0
    assert any(str(path) in line and "counting today from 0" in line for line in warnings(logged))
    budget.charge(5)
    assert DailyBudget(100, path, today=Calendar()).spent == 5  # written whole again


def test_an_unwritable_file_keeps_counting_in_memory(tmp_path: Path, logged) -> None:
    (tmp_path / "a-file").write_text("")
    budget = DailyBudget(10, tmp_path / "a-file" / STATE_FILE, today=Calendar())
    for _ in range(3):
        budget.charge(4)
    assert budget.exhausted()
    assert sum("cannot write the spend file" in line for line in warnings(logged)) == 1


# -- the upstream under a budget -------------------------------------------------------------------


def upstream_source(up: LoopbackUpstream, budget: DailyBudget | None = None, max_tokens: int | None = 64) -> OpenAISource:
    model = chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=max_tokens)
    return OpenAISource(model, backoff=0.01, budget=budget)


def sent_max_tokens(body: dict) -> int | None:
    """The request's limit as the upstream got it (LangChain sends ``max_completion_tokens``)."""
    return body.get("max_completion_tokens", body.get("max_tokens"))


async def answer(source, sampling: Sampling = DEFAULT_SAMPLING):
    send = Recorder()
    result = await stream_answer(source, MESSAGES, send.emit, batch_size=4, deadline=far(), sampling=sampling)
    return send.text, result


async def test_the_upstream_s_own_usage_is_charged_then_it_is_not_called() -> None:
    budget = DailyBudget(2 * COST, today=Calendar())
    with LoopbackUpstream(tokens=WORDS) as up:
        source = upstream_source(up, budget)
        for spent in (COST, 2 * COST):
            text, result = await answer(source)
            assert text == "".join(WORDS) and budget.spent == spent
        assert source.closed() is not None and "daily token budget" in source.closed()
        text, result = await answer(source)
        assert (text, result.outcome, type(result.error)) == ("", "error", Closed)
        assert len(up.requests) == 2  # the third was never sent


async def test_a_cut_stream_without_usage_is_estimated() -> None:
    from openai_miner.testing.upstream import Fault

    budget = DailyBudget(10_000, today=Calendar())
    with LoopbackUpstream(tokens=WORDS, fault=Fault(drop_after=4)) as up:
        text, result = await answer(upstream_source(up, budget))
    assert result.outcome == "error" and text.startswith("w0 w1 ")
    assert budget.spent >= 4  # a token a chunk sent, and the prompt's estimate


async def test_once_spent_the_local_model_answers_and_the_breaker_is_untouched(logged) -> None:
    budget = DailyBudget(1, today=Calendar())
    budget.charge(1)
    with LoopbackUpstream(tokens=WORDS) as up:
        fallback = FallbackSource(upstream_source(up, budget), FakeSource(["local"], name="local"), CircuitBreaker(1, 60.0))
        for _ in range(3):
            text, result = await answer(fallback)
            assert (text, result.outcome, result.source) == ("local", "complete", "local")
        assert up.requests == [] and fallback.breaker.state == "closed" and fallback.closed() is None
    assert not any("upstream failed" in line for line in warnings(logged))


@pytest.mark.parametrize(("asked", "sent"), [(5000, 64), (65, 64), (64, 64), (3, 3), (None, 64)])
async def test_a_request_s_max_tokens_is_capped(asked: int | None, sent: int) -> None:
    with LoopbackUpstream(tokens=WORDS) as up:
        await answer(upstream_source(up), Sampling(max_tokens=asked))
    assert sent_max_tokens(up.requests[0].body) == sent


# -- every front, with the real miner --------------------------------------------------------------


def budget_flags(up: LoopbackUpstream, state: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--openai.base_url", up.base_url, "--openai.daily_token_budget", "1", "--neuron.state_dir", str(state),
        "--openai.max_tokens", "64", *extra,
    )


async def test_spent_without_a_local_model_every_front_refuses_503_and_a_restart_remembers(
    serve_miner, validator, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with LoopbackUpstream(tokens=WORDS) as up:
        miner = serve_miner(*budget_flags(
            up, state, "--fallback.off", "--http.port", str(free_port()), "--loosh.port", str(free_port())
        ))
        hotkey = miner.wallet.hotkey.ss58_address
        async with signing_client(validator.hotkey, hotkey) as client:
            first = await ask_http(client, miner.config.http.port, "two words", extra={"max_tokens": 100_000})
            assert first.ok and first.text == "".join(WORDS)
            assert sent_max_tokens(up.requests[0].body) == 64  # the request's 100,000 capped
            refused = await ask_http(client, miner.config.http.port, "two words")
        assert refused.status == 503 and "daily token budget" in refused.message
        async with bt.Dendrite(wallet=validator) as dendrite:
            by_axon = await ask(dendrite, miner.axon, ["user"], ["two words"], 10.0)
        assert by_axon.status == 503 and "daily token budget" in by_axon.message
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{miner.config.loosh.port}") as client:
            sn78 = LooshValidator(validator.hotkey, client)
            assert not await sn78.available()
            reply = await sn78.ask({"prompt": "two words", "correlation_id": "c-1"})
        assert reply.status == 503
        assert len(up.requests) == 1
        assert json.loads((state / STATE_FILE).read_text())["spent"] == miner.core.budget.spent > COST  # system prompt too
        miner.stop_run_thread()

        again = serve_miner(*budget_flags(up, state, "--fallback.off", "--axon.off", "--http.port", str(free_port())))
        assert f"| upstream budget 1 tokens a day, {miner.core.budget.spent} spent today |" in cli.summary(again)
        scraped = {
            sample.name: sample.value
            for family in text_string_to_metric_families(generate_latest(again.core.metrics.registry).decode())
            for sample in family.samples
        }
        assert scraped["openai_miner_upstream_tokens_spent_today"] == again.core.budget.spent > 0
        assert scraped["openai_miner_upstream_token_budget"] == 1
        async with signing_client(validator.hotkey, hotkey) as client:
            after = await ask_http(client, again.config.http.port, "two words")
        assert after.status == 503 and len(up.requests) == 1


async def test_spent_with_a_local_model_it_answers_every_request(serve_miner, validator, tmp_path, tiny_model) -> None:
    from tests.helpers import local_flags

    with LoopbackUpstream(tokens=WORDS) as up:
        miner = serve_miner(*budget_flags(up, tmp_path / "state", "--axon.off", "--http.port", str(free_port())), *local_flags(tiny_model))
        async with signing_client(validator.hotkey, miner.wallet.hotkey.ss58_address) as client:
            answers = [await ask_http(client, miner.config.http.port, "two words") for _ in range(3)]
    assert all(answer.ok for answer in answers) and len(up.requests) == 1
    assert answers[0].text == "".join(WORDS) and all("w1 w2" not in answer.text for answer in answers[1:])
    assert miner.core.stats.by_source() == {"openai": 1, "local": 2}
    assert miner.can_answer()
