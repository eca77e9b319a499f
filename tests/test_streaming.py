import asyncio
import math
import time

import pytest

from openai_miner.sources.base import Answering
from openai_miner.streaming import stream_answer, stream_deadline
from openai_miner.testing.fake_source import FakeSource
from tests.helpers import Recorder, eventually, far


@pytest.mark.parametrize("n,batch", [(1, 12), (12, 12), (13, 12), (25, 12), (100, 7), (5, 1), (0, 3)])
async def test_exact_batches(n: int, batch: int) -> None:
    tokens = [f"t{i} " for i in range(n)]
    send = Recorder()
    result = await stream_answer(FakeSource(tokens), [], send.emit, batch_size=batch, deadline=far())
    assert result.outcome == "complete"
    assert len(send.messages) == math.ceil(n / batch) == result.sends
    assert send.text == "".join(tokens)
    assert all(m["more_body"] is True and m["type"] == "http.response.body" for m in send.messages)
    full = [m for m in send.messages[:-1]]
    assert all(m["body"].decode().count("t") == batch for m in full)


async def test_multibyte_and_newlines_pass_through() -> None:
    tokens = ["é", "\n", "日本", "\n\n", "🙂"]
    send = Recorder()
    await stream_answer(FakeSource(tokens), [], send.emit, batch_size=2, deadline=far())
    assert send.text == "é\n日本\n\n🙂"


async def test_the_result_names_the_source_that_answered_never_sending_the_name() -> None:
    class HandsOver(FakeSource):
        async def produce(self, messages, queue, deadline, sampling) -> None:
            queue.put_nowait(Answering("local"))
            await super().produce(messages, queue, deadline, sampling)

    send = Recorder()
    asked = await stream_answer(FakeSource(["a"], name="upstream"), [], send.emit, batch_size=1, deadline=far())
    handed = await stream_answer(HandsOver(["b"], name="fallback"), [], send.emit, batch_size=1, deadline=far())
    assert (asked.source, handed.source) == ("upstream", "local") and send.text == "ab"


async def test_deadline_flushes_buffer_and_cancels_source() -> None:
    source = FakeSource([f"w{i}" for i in range(100)], interval=0.02)
    send = Recorder()
    start = time.monotonic()
    result = await stream_answer(source, [], send.emit, batch_size=50, deadline=start + 0.3)
    elapsed = time.monotonic() - start
    assert result.outcome == "deadline"
    assert elapsed >= 0.28  # not before the deadline (a slow machine only makes it later)
    # fewer than one batch arrived: without the flush the validator would get nothing
    assert 1 <= result.tokens < 50
    assert send.text == "".join(f"w{i}" for i in range(result.tokens))
    await eventually(lambda: source.cancelled == 1, within=2)  # stopped, not left to run its 2 s
    assert source.finished == 0


async def test_error_before_first_token_ends_empty() -> None:
    send = Recorder()
    result = await stream_answer(FakeSource(["a"], fail_after=0), [], send.emit, batch_size=4, deadline=far())
    assert result.outcome == "error" and result.tokens == 0
    assert send.messages == []
    assert "scripted failure" in str(result.error)


async def test_error_mid_stream_flushes_what_came_before() -> None:
    send = Recorder()
    result = await stream_answer(
        FakeSource(list("abcdef"), fail_after=5), [], send.emit, batch_size=4, deadline=far()
    )
    assert result.outcome == "error"
    assert send.text == "abcde"


async def test_failed_send_stops_the_source() -> None:
    source = FakeSource([str(i) for i in range(1000)], interval=0.001)
    send = Recorder(fail_on=2)
    result = await stream_answer(source, [], send.emit, batch_size=5, deadline=far())
    assert result.outcome == "disconnected"
    await eventually(lambda: source.cancelled == 1, within=2)
    assert source.finished == 0


async def test_concurrent_streams_do_not_block_each_other() -> None:
    """32 answers at once, each source waiting until all 32 produce: an answer that held up the
    others would never let them start, and none would end (no wall-clock bound to tune)."""
    producing = 0
    everyone = asyncio.Event()

    class WaitsForAll(FakeSource):
        async def produce(self, messages, queue, deadline, sampling) -> None:
            nonlocal producing
            producing += 1
            if producing == 32:
                everyone.set()
            await everyone.wait()
            await super().produce(messages, queue, deadline, sampling)

    sends = [Recorder() for _ in range(32)]
    answers = (
        stream_answer(WaitsForAll([f"{i} "] * 20, interval=0.001), [], send.emit, batch_size=3, deadline=far())
        for i, send in enumerate(sends)
    )
    results = await asyncio.wait_for(asyncio.gather(*answers), 10)
    assert [r.outcome for r in results] == ["complete"] * 32
    assert [send.text for send in sends] == [f"{i} " * 20 for i in range(32)]


def test_deadline_margin() -> None:
    assert stream_deadline(12.0, now=100.0, margin=0.5) == pytest.approx(111.5)
    assert stream_deadline(1.0, now=0.0, margin=0.5) == pytest.approx(0.75)
    assert stream_deadline(None, now=0.0, margin=0.5) == pytest.approx(11.5)


async def test_bad_batch_size() -> None:
    with pytest.raises(ValueError):
        await stream_answer(FakeSource([]), [], Recorder().emit, batch_size=0, deadline=far())
