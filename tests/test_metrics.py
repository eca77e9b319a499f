"""The metrics front: /metrics scraped and parsed as Prometheus does, /health, never advertised;
refusal kinds bounded; the fallback gauge; upstream errors from a real failing upstream; the local
model's batch and queue; spend against the budget; the Grafana dashboard asks only for what is exposed."""

import asyncio
import json
import re
import time
from datetime import date
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from openai_miner import cli
from openai_miner.access import MAX_KINDS, Access, AccessPolicy, RateLimiter, RecentPrompts, Refusals, reason_kind
from openai_miner.chain import Registry
from openai_miner.budget import DailyBudget
from openai_miner.core import Core, Question
from openai_miner.messages import Message
from openai_miner.metrics import Metrics
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.system_prompts import SystemPrompts
from openai_miner.miner import OpenAIMiner
from openai_miner.testing import Fault, LoopbackUpstream, ask_http, free_port, miner_argv, signing_client
from openai_miner.testing.fake_source import FakeSource

WORDS = ["one", " two", " three"]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_each_answer_by_front_outcome_and_source_and_health_reports(serve_miner, validator, wallets) -> None:
    http_port, metrics_port = free_port(), free_port()
    miner = serve_miner("--axon.off", "--http.port", str(http_port), "--metrics.port", str(metrics_port), source=FakeSource(WORDS))
    async with signing_client(validator.hotkey, miner.wallet.hotkey.ss58_address) as client:
        for _ in range(2):
            answer = await ask_http(client, http_port, "hello")
            assert answer.ok, answer
    stranger = wallets("stranger")  # not registered: refused before any model work
    async with signing_client(stranger.hotkey, miner.wallet.hotkey.ss58_address) as client:
        assert (await ask_http(client, http_port, "hello")).status == 403
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as client:
        scraped = await client.get("/metrics")
        health = await client.get("/health")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    found = samples(scraped.text)
    http = ("front", "http")
    assert found["openai_miner_answers_total", frozenset({http, ("outcome", "complete"), ("source", "fake")})] == 2
    assert found["openai_miner_tokens_out_total", frozenset({http, ("source", "fake")})] == 6
    assert found["openai_miner_first_chunk_seconds_count", frozenset({http})] == 2
    assert found["openai_miner_answer_seconds_count", frozenset({http})] == 2
    assert found["openai_miner_answer_seconds_bucket", frozenset({http, ("le", "+Inf")})] == 2
    assert found["openai_miner_refusals_total", frozenset({("reason", "hotkey * is not registered on this subnet")})] == 1
    assert health.status_code == 200 and health.json() == {
        "status": "ok", "answers": {"complete": 2, "tokens": 6, "by_source": {"fake": {"complete": 2}}},
    }


def test_the_metrics_front_is_never_advertised_and_listens_on_loopback_by_default(serve_miner) -> None:
    port = free_port()
    miner = serve_miner("--metrics.port", str(port), source=FakeSource(WORDS))
    assert miner.advertised.name == "axon" and [front.name for front in miner.fronts] == ["axon", "metrics"]
    assert f"metrics 127.0.0.1:{port}" in cli.summary(miner) and "(advertised" not in cli.summary(miner).split("metrics")[1]


def test_the_metrics_front_alone_serves_no_validator(tmp_path, capsys) -> None:
    argv = miner_argv(tmp_path / "w", free_port(), "--fallback.off", "--openai.base_url", "http://127.0.0.1:9/v1",
                      "--axon.off", "--metrics.port", str(free_port()))
    assert cli.main(argv) == 2
    assert "nothing to serve: every front is off" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        OpenAIMiner.config(["--advertise", "metrics"], env={})


def test_a_refusal_kind_is_bounded_whatever_callers_send() -> None:
    hotkey = "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX"
    assert reason_kind(f"hotkey {hotkey} stake 0.5 is below 10") == "hotkey * stake * is below *"
    assert reason_kind("invalid prompt: message 3 is empty") == "invalid prompt"
    refusals = Refusals(every=1e9)
    for n in range(MAX_KINDS + 10):
        refusals.count(f"kind {chr(65 + n % 26)}{chr(97 + n // 26)}")
    assert len(refusals.totals) == MAX_KINDS + 1 and refusals.totals["other"] == 10


def test_fallback_active_follows_the_circuit_breaker() -> None:
    breaker = CircuitBreaker(1, 60.0)
    source = FallbackSource(FakeSource(WORDS, name="openai"), FakeSource(WORDS, name="local"), breaker)
    access = Access(AccessPolicy(), Registry.of([]), RateLimiter(60), RecentPrompts(0.0))
    core = Core(source, access, SystemPrompts({}))

    def active() -> float:
        found = samples(generate_latest(core.metrics.registry).decode())
        return found["openai_miner_fallback_active", frozenset()]

    assert active() == 0
    breaker.failure()  # one failure opens it: the upstream is skipped
    assert active() == 1
    assert "openai_miner_fallback_active" not in generate_latest(
        Core(FakeSource(WORDS), access, SystemPrompts({})).metrics.registry
    ).decode()  # one source: nothing to fall back from


def open_access() -> Access:
    return Access(AccessPolicy(), Registry.of([]), RateLimiter(600), RecentPrompts(0.0))


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    return samples(generate_latest(metrics.registry).decode())


async def ignore(batch) -> None:
    pass


async def test_upstream_errors_are_counted_by_status_every_attempt_retried_ones_too() -> None:
    with LoopbackUpstream(tokens=["Hi", " there"]) as up:
        model = chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=32)
        core = Core(OpenAISource(model, max_retries=2, backoff=0.01), open_access(), SystemPrompts({}))
        question = Question([Message("user", "hello")], time.monotonic() + 30, front="http")

        def errors() -> dict[str, float]:
            found = scrape(core.metrics)
            return {dict(labels)["kind"]: value for (name, labels), value in found.items() if name == "openai_miner_upstream_errors_total"}

        assert errors() == {}  # the family is there, with no series yet
        up.fault = Fault(status=500, times=2)  # two failed attempts, then the retry answers
        assert (await core.answer(question, ignore)).outcome == "complete"
        assert errors() == {"500": 2}
        up.fault = Fault(status=429)  # every attempt: the answer fails after 1 + 2 retries
        assert (await core.answer(question, ignore)).outcome == "error"
        assert errors() == {"500": 2, "429": 3}
        up.fault = Fault(malformed_after=1)  # a chunk that cannot be read, after the first token: not retried
        await core.answer(question, ignore)
        assert errors() == {"500": 2, "429": 3, "malformed": 1}
    assert "openai_miner_upstream_errors" not in generate_latest(
        Core(FakeSource(WORDS), open_access(), SystemPrompts({})).metrics.registry
    ).decode()  # no upstream: no such family


async def test_a_stalled_upstream_the_local_model_answered_for_is_counted_as_stalled() -> None:
    with LoopbackUpstream(tokens=["Hi"], first_token_delay=30) as up:
        model = chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=32)
        fallback = FallbackSource(OpenAISource(model), FakeSource(["local"], name="local"), CircuitBreaker(3, 60.0))
        core = Core(fallback, open_access(), SystemPrompts({}))
        question = Question([Message("user", "hello")], time.monotonic() + 1.0, front="http")
        result = await core.answer(question, ignore)
    assert (result.source, result.outcome) == ("local", "complete")
    found = scrape(core.metrics)
    assert {dict(labels)["kind"]: value for (name, labels), value in found.items() if name == "openai_miner_upstream_errors_total"} == {"stalled": 1}


async def test_the_local_model_s_batch_and_queue_are_gauges(tiny_model: str) -> None:
    from tests.helpers import eventually
    from tests.helpers import local_source

    local = local_source(tiny_model, max_new_tokens=5000, max_batch=1)
    core = Core(FallbackSource(None, local, CircuitBreaker(3, 60.0)), open_access(), SystemPrompts({}))

    def load() -> tuple[float, float]:
        found = scrape(core.metrics)
        return found["openai_miner_local_generating", frozenset()], found["openai_miner_local_waiting", frozenset()]

    assert load() == (0, 0)
    deadline = time.monotonic() + 60
    first_queue: asyncio.Queue = asyncio.Queue()
    first = asyncio.create_task(local.produce([Message("user", "count")], first_queue, deadline))
    await eventually(lambda: not first_queue.empty(), within=30)  # generating: the batch's one place is taken
    second = asyncio.create_task(local.produce([Message("user", "wait")], asyncio.Queue(), deadline))
    await eventually(lambda: local.waiting == 1, within=30)
    assert load() == (1, 1)
    for task in (second, first):
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    await eventually(lambda: local.generating == 0, within=30)
    assert load() == (0, 0)


def test_spend_against_the_budget_is_read_at_each_scrape() -> None:
    days = [date(2026, 12, 4)]
    budget = DailyBudget(100_000, today=lambda: days[0])
    metrics = Metrics(budget=budget)
    budget.charge(1_234)
    found = scrape(metrics)
    assert found["openai_miner_upstream_tokens_spent_today", frozenset()] == 1_234
    assert found["openai_miner_upstream_token_budget", frozenset()] == 100_000
    budget.charge(66)
    assert scrape(metrics)["openai_miner_upstream_tokens_spent_today", frozenset()] == 1_300
    days[0] = date(2026, 12, 5)  # a new UTC day: the scrape reads 0 before anything is spent
    assert scrape(metrics)["openai_miner_upstream_tokens_spent_today", frozenset()] == 0
    assert "openai_miner_upstream_token" not in generate_latest(Metrics().registry).decode()  # no budget: no gauges


DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"


def every_metric() -> Metrics:
    """A registry with every series the miner can expose, each with at least one sample."""
    metrics = Metrics(
        refusals=lambda: {"invalid prompt": 1}, fallback_active=lambda: False,
        upstream_errors=lambda: {"429": 1}, local_load=lambda: (1, 0), budget=DailyBudget(100),
    )
    metrics.observe("axon", "complete", "openai", 12, 0.2, 1.5)
    return metrics


def test_the_grafana_dashboard_asks_only_for_what_the_miner_exposes_and_shows_all_of_it() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = {name for name, _ in scrape(every_metric())}
    families = {  # what the miner exposes, less prometheus_client's own `_created` timestamps
        family.name for family in text_string_to_metric_families(generate_latest(every_metric().registry).decode())
        if not family.name.endswith("_created")
    }
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    asked = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            names = set(re.findall(r"\bopenai_miner_\w+", target["expr"]))
            assert names and names <= exposed, (panel["title"], names - exposed)
            asked |= names
    shown = {family for family in families if any(name.startswith(family) for name in asked)}
    assert shown == families, families - shown  # a metric added to the miner needs a panel
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_what_the_metrics_read_is_asked_of_the_sources_package_not_of_their_types() -> None:
    from openai_miner import sources

    upstream, local = FakeSource(WORDS, name="openai"), FakeSource(WORDS, name="local")
    both = FallbackSource(upstream, local, CircuitBreaker(1, 60.0))
    assert sources.members(both) == [upstream, local] and sources.members(upstream) == [upstream]
    assert sources.fallback_name(both) == "local" and sources.fallback_active(both)() is False
    both.breaker.failure()
    assert sources.fallback_active(both)() is True and both.skipping_upstream
    alone = FallbackSource(None, local, CircuitBreaker(1, 60.0))
    assert sources.fallback_name(alone) is None and sources.fallback_active(alone) is None
    assert sources.upstream_errors(both) is None and sources.local_load(both) is None  # fakes count neither


def test_no_module_outside_sources_asks_a_source_its_type() -> None:
    """Issue 23: what a source has (members, fallback, errors, batch) is asked of ``openai_miner.sources``;
    an ``isinstance(x, ...Source)`` elsewhere would let core.py or a front grow its own copy again."""
    import ast

    package = Path(__file__).resolve().parents[1] / "openai_miner"
    found = []
    for path in sorted(package.rglob("*.py")):
        if "sources" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                names = {getattr(kind, "id", getattr(kind, "attr", "")) for kind in kinds}
                if any(name.endswith("Source") for name in names):
                    found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert found == []
