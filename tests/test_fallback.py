import asyncio
import time

import pytest

from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.streaming import StreamResult, stream_answer
from openai_miner.testing.fake_source import FakeSource
from tests.helpers import Recorder, far


def source(primary, local, failures=3, cooldown=10.0, clock=time.monotonic) -> FallbackSource:
    return FallbackSource(primary, local, CircuitBreaker(failures, cooldown, clock))


async def answered(src: FallbackSource) -> tuple[str, StreamResult]:
    send = Recorder()
    result = await stream_answer(src, [], send.emit, batch_size=2, deadline=far())
    return send.text, result


async def answer(src: FallbackSource) -> tuple[str, str]:
    text, result = await answered(src)
    return text, result.outcome


async def test_no_primary_answers_locally() -> None:
    text, result = await answered(source(None, FakeSource(["local"], name="local")))
    assert (text, result.outcome, result.source) == ("local", "complete", "local")


async def test_failure_before_first_token_falls_back_for_the_same_request() -> None:
    primary, local = FakeSource(["up"], fail_after=0, name="up"), FakeSource(["lo", "cal"], name="local")
    text, result = await answered(source(primary, local))
    assert (text, result.outcome, result.source) == ("local", "complete", "local")
    assert len(primary.seen) == len(local.seen) == 1


async def test_failure_after_first_token_ends_cleanly_without_local_text() -> None:
    primary, local = FakeSource(["a", "b", "c"], fail_after=2), FakeSource(["LOCAL"])
    text, outcome = await answer(source(primary, local))
    assert (text, outcome) == ("ab", "error")
    assert local.seen == []


async def test_no_local_reraises() -> None:
    assert await answer(source(FakeSource(["x"], fail_after=0), None)) == ("", "error")


async def test_breaker_opens_then_half_opens_with_one_probe() -> None:
    now = [0.0]
    primary, local = FakeSource(["up"], fail_after=0, name="up"), FakeSource(["lo"], name="local")
    src = source(primary, local, failures=2, cooldown=30.0, clock=lambda: now[0])
    for _ in range(2):
        assert (await answer(src))[0] == "lo"
    assert src.breaker.state == "open" and len(primary.seen) == 2
    await answer(src)  # open: straight to local, upstream not tried
    assert len(primary.seen) == 2 and len(local.seen) == 3
    now[0] = 31.0
    primary.fail_after = None  # upstream is back
    text, result = await answered(src)  # the probe
    assert (text, result.outcome, result.source) == ("up", "complete", "up")
    assert src.breaker.state == "closed"


async def test_failed_probe_reopens() -> None:
    now = [0.0]
    src = source(FakeSource(["up"], fail_after=0), FakeSource(["lo"]), failures=1, cooldown=5, clock=lambda: now[0])
    await answer(src)
    assert src.breaker.state == "open"
    now[0] = 6.0
    assert src.breaker.allow() and src.breaker.state == "half-open"
    assert not src.breaker.allow()  # only one probe at a time
    src.breaker.failure()
    assert src.breaker.state == "open" and src.breaker.opened_at == 6.0


async def test_slow_upstream_cancelled_at_deadline_is_not_a_failure() -> None:
    primary = FakeSource(["x"] * 10, interval=0.05)
    src = source(primary, FakeSource(["lo"]), failures=1)
    send = Recorder()
    result = await stream_answer(src, [], send.emit, batch_size=2, deadline=time.monotonic() + 0.12)
    assert result.outcome == "deadline"
    await asyncio.sleep(0.01)
    assert src.breaker.state == "closed" and src.breaker.consecutive == 0


def test_needs_a_source() -> None:
    with pytest.raises(ValueError):
        FallbackSource(None, None, CircuitBreaker(1, 1))


async def test_an_upstream_that_sends_no_first_token_in_time_is_a_failure_and_local_answers() -> None:
    stalled, local = FakeSource(["up"], interval=30), FakeSource(["lo", "cal"])
    src = FallbackSource(stalled, local, CircuitBreaker(3, 10.0), first_token_share=0.5)
    send = Recorder()
    started = time.monotonic()
    result = await stream_answer(src, [], send.emit, batch_size=2, deadline=started + 1.0)
    assert (send.text, result.outcome) == ("local", "complete")
    assert stalled.cancelled == 1 and src.breaker.consecutive == 1  # counted against the upstream
    assert time.monotonic() - started < 1.0  # waited half the time left, not all of it


async def test_a_slow_upstream_that_has_started_is_not_cut() -> None:
    slow, local = FakeSource(["a", "b", "c"], interval=0.2), FakeSource(["local"])
    src = FallbackSource(slow, local, CircuitBreaker(3, 10.0), first_token_share=0.5)
    send = Recorder()
    result = await stream_answer(src, [], send.emit, batch_size=1, deadline=time.monotonic() + 1.5)
    assert (send.text, result.outcome) == ("abc", "complete") and src.breaker.consecutive == 0


async def test_without_a_local_model_a_slow_first_token_is_waited_for() -> None:
    slow = FakeSource(["late"], interval=0.4)
    src = FallbackSource(slow, None, CircuitBreaker(3, 10.0), first_token_share=0.1)
    send = Recorder()
    result = await stream_answer(src, [], send.emit, batch_size=1, deadline=time.monotonic() + 1.0)
    assert (send.text, result.outcome) == ("late", "complete")
