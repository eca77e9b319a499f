"""The metrics front: /metrics scraped and parsed as Prometheus does, /health, never advertised;
refusal kinds bounded; the fallback gauge."""

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from openai_miner import cli
from openai_miner.access import MAX_KINDS, Access, AccessPolicy, RateLimiter, RecentPrompts, Refusals, reason_kind
from openai_miner.chain import Registry
from openai_miner.core import Core
from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.system_prompts import SystemPrompts
from openai_miner.miner import OpenAIMiner
from openai_miner.testing import ask_http, free_port, miner_argv, signing_client
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
