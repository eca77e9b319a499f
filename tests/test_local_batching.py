"""LocalSource's continuous batch: requests with their own deadlines and settings in one batch, cancel
and join mid-batch, dtype choice, repetition guard, logprobs. Ordering and overlap only, no timings."""

import asyncio
import re
import time
from collections import Counter
from typing import Any

import pytest
import torch
from openai_miner.messages import Message
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from tests.helpers import DEVICE
from tests.helpers import STARTED
from tests.helpers import local_source as source
from openai_miner.sources.base import Finish, Sampling, Token
from openai_miner.sources.local import LocalSource
from openai_miner.sources.local_batch import batch_processors
from openai_miner.sources.local_model import pick_dtype

QUESTION = [Message("user", "what is the capital of france ?")]
class Stream:
    """One request's produce task and the (arrival order, item) of what it streamed."""

    clock = 0

    def __init__(self, local: LocalSource, deadline: float, sampling: Sampling = Sampling()) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.items: list[tuple[int, Any]] = []
        self.ended_at: int | None = None
        self.task = asyncio.create_task(local.produce(QUESTION, self.queue, deadline, sampling))
        self.task.add_done_callback(self._ended)
        self.pump = asyncio.create_task(self._pump())

    @classmethod
    def tick(cls) -> int:
        cls.clock += 1
        return cls.clock

    def _ended(self, _: Any) -> None:
        self.ended_at = self.tick()

    async def _pump(self) -> None:
        while True:
            item = await self.queue.get()
            if not isinstance(item, Finish):  # the answer's last item: its usage, no text
                self.items.append((self.tick(), item))

    async def count(self, n: int, limit: float = 20) -> None:
        started = time.monotonic()
        while len(self.items) < n and time.monotonic() - started < limit and not self.task.done():
            await asyncio.sleep(0.005)
        assert len(self.items) >= n

    async def finish(self) -> None:
        try:
            await self.task
        finally:
            await asyncio.sleep(0)
            self.pump.cancel()


def drained(queue: asyncio.Queue) -> str:
    """The text a finished answer left on its queue (its :class:`Finish` is no text)."""
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    return "".join(item for item in items if isinstance(item, str))


async def until(condition: Any, limit: float = 5) -> None:
    started = time.monotonic()
    while not condition() and time.monotonic() - started < limit:
        await asyncio.sleep(0.002)
    assert condition()


def test_pick_dtype() -> None:
    assert pick_dtype("auto", "cuda", bf16_supported=lambda: True) is torch.bfloat16
    assert pick_dtype(None, "cuda:1", bf16_supported=lambda: False) is torch.float16
    assert pick_dtype("auto", "cpu", bf16_supported=lambda: True) is torch.float32
    assert pick_dtype("bfloat16", "cpu") is torch.bfloat16
    assert pick_dtype("float32", "cuda", bf16_supported=lambda: True) is torch.float32
    with pytest.raises(ValueError, match="not one of"):
        pick_dtype("int8", "cpu")


def test_describe_names_model_device_and_dtype(tiny_model: str) -> None:
    local = LocalSource(tiny_model, device="cpu", dtype="bfloat16")
    assert local.describe() == f"local ({tiny_model.rstrip('/').rsplit('/', 1)[-1]} on cpu, bfloat16)"
    local.load()
    assert local.load().model.dtype is torch.bfloat16 and local.describe().endswith(", bfloat16)")


class Request:
    def __init__(self, ids: list[int]) -> None:  # the first token stands for the prompt
        self.state = type("State", (), {"initial_tokens": ids[:1], "generated_tokens": ids[1:]})


def test_batch_repetition_penalty_equals_transformers_over_the_answer() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    histories = [[1, 2, 3, 3], [49, 0, 5], [7, 8]]
    penalty, _ = batch_processors(1.3)
    penalty.prepare_tensor_args([Request(ids) for ids in histories])
    batched = penalty(scores.clone(), torch.zeros(3, dtype=torch.int32))
    reference = RepetitionPenaltyLogitsProcessor(1.3)
    for row, ids in enumerate(histories):
        expected = reference(torch.tensor([ids[1:]]), scores[row : row + 1].clone())
        assert torch.equal(batched[row], expected[0])
    assert not torch.equal(batched, scores)


def test_the_guard_spares_the_prompt_and_the_end_of_turn() -> None:
    """Penalizing the prompt's end-of-turn markers kept SmolLM2 from ever stopping."""
    scores = torch.randn(1, 50)
    penalty, _ = batch_processors(1.3, exempt=frozenset({2}))
    penalty.prepare_tensor_args([Request([9, 2, 4])])  # prompt 9; answer: end-of-turn 2, then 4
    guarded = penalty(scores.clone(), torch.zeros(1, dtype=torch.int32))
    changed = {int(i) for i in torch.nonzero(guarded[0] != scores[0])}
    assert changed == {4}


async def test_requests_with_their_own_deadlines_and_lengths_share_the_batch(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=5000, max_batch=4)
    now = time.monotonic()
    short = Stream(local, now + 60, Sampling(max_tokens=5))
    hasty = Stream(local, now + 1.0)  # ends at its deadline
    long = Stream(local, now + 60, Sampling(temperature=0.9))
    await asyncio.wait_for(short.finish(), 20)
    assert len("".join(item for _, item in short.items).split()) == 5
    await asyncio.wait_for(hasty.finish(), 20)
    assert time.monotonic() >= now + 1.0
    assert hasty.items and long.items and not long.task.done()
    # All three were in one batch at once: each streamed before the hasty one ended at its deadline
    # (the short one may end first: on a GPU its 5 tokens can take less than another's admission).
    assert all(stream.items[0][0] < hasty.ended_at for stream in (short, hasty, long))
    # The long one goes on after both others ended.
    seen = len(long.items)
    await long.count(seen + 5)
    assert long.items[-1][0] > hasty.ended_at and not long.task.done()
    long.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long.finish()


async def test_cancel_mid_batch_stops_that_request_only(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=5000, max_batch=4)
    deadline = time.monotonic() + 60
    kept, dropped = Stream(local, deadline), Stream(local, deadline)
    await kept.count(3)
    await dropped.count(3)
    assert local.generating == 2
    dropped.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dropped.finish()
    await until(lambda: local.generating == 1)  # the batch dropped it: one request left generating
    left = len(dropped.items)
    seen = len(kept.items)
    await kept.count(seen + 20)
    assert len(dropped.items) == left and dropped.queue.empty()
    assert not kept.task.done()
    kept.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await kept.finish()
    await until(lambda: local.generating == 0)


async def test_a_request_joining_mid_batch_starts_before_the_first_ends(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=3000, max_batch=4)
    deadline = time.monotonic() + 60
    first = Stream(local, deadline)
    await first.count(10)
    joined = Stream(local, deadline, Sampling(max_tokens=5))
    await asyncio.wait_for(joined.finish(), 20)
    assert joined.items and not first.task.done()
    assert joined.items[0][0] > first.items[0][0]
    first.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first.finish()


async def test_max_batch_1_answers_one_at_a_time(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=40, max_batch=1)
    deadline = time.monotonic() + 60
    streams = [Stream(local, deadline) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*(stream.finish() for stream in streams)), 30)
    spans = sorted((s.items[0][0], s.items[-1][0], s.ended_at) for s in streams)
    for (_, _, ended), (next_first, _, _) in zip(spans, spans[1:]):
        assert next_first > ended


async def test_logprobs_come_from_the_model_with_n_alternatives(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=12)
    for sampling in (Sampling(top_logprobs=3), Sampling(top_logprobs=2, temperature=1.0, seed=5)):
        stream = Stream(local, time.monotonic() + 30, sampling)
        await asyncio.wait_for(stream.finish(), 20)
        items = [item for _, item in stream.items]
        assert len(items) == 12
        for item in items:
            assert isinstance(item, Token) and len(item.top) == sampling.top_logprobs
            assert item.logprob <= 0 and all(lp <= 0 for _, lp in item.top)
            assert [lp for _, lp in item.top] == sorted((lp for _, lp in item.top), reverse=True)
            assert item.logprob <= item.top[0][1] + 1e-6
            for text, logprob in item.top:  # the chosen token among the alternatives: same logprob
                if text == item.text.strip():
                    assert logprob == pytest.approx(item.logprob)
            if sampling.temperature is None:  # greedy: the chosen token is the most likely
                assert item.text.strip() == item.top[0][0] and item.logprob == item.top[0][1]


async def test_seed_makes_a_sampled_answer_reproducible(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=20)
    answers = []
    for seed in (7, 7, 8):
        queue: asyncio.Queue[str] = asyncio.Queue()
        await local.produce(QUESTION, queue, time.monotonic() + 30, Sampling(temperature=1.5, seed=seed))
        answers.append(drained(queue))
    assert answers[0] == answers[1] != answers[2]


async def test_stop_string_ends_the_answer_before_it(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=60)
    queue: asyncio.Queue[str] = asyncio.Queue()
    await local.produce(QUESTION, queue, time.monotonic() + 30)
    full = drained(queue)
    words = full.split()
    stop = " ".join(words[3:5])
    await local.produce(QUESTION, queue, time.monotonic() + 30, Sampling(stop=(stop,)))
    cut = drained(queue)
    assert cut == full[: full.index(stop)]
    await until(lambda: local.generating == 0)


def repeated_4grams(text: str) -> dict[tuple[str, ...], int]:
    words = re.findall(r"[\w']+", text.lower())
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return {gram: n for gram, n in grams.items() if n > 2}


@pytest.mark.slow
async def test_real_smollm2_does_not_loop(smollm2) -> None:
    """The haiku of the issue, and a prompt that makes SmolLM2 loop without the guard (checked)."""
    path, loader = smollm2  # one load for both sources (and the worker's other SmolLM2 tests)
    prompts = ["Write a haiku about rivers", "Write a long poem about rivers"]

    async def answers(local: LocalSource) -> list[str]:
        STARTED.append(local)
        await asyncio.to_thread(local.load)
        queues: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in prompts]
        deadline = time.monotonic() + 120
        try:
            await asyncio.gather(
                *(local.produce([Message("user", p)], q, deadline) for p, q in zip(prompts, queues))
            )
        finally:
            local.close()  # its batch stops before the next source's starts on the same model
        return [drained(q) for q in queues]

    started = time.monotonic()
    guarded = await answers(LocalSource(path, device=DEVICE, temperature=0, loader=loader))
    print(f"\nSmolLM2, two prompts in one batch, {time.monotonic() - started:.1f}s: {guarded!r}")
    assert all(text.strip() for text in guarded)
    assert [repeated_4grams(text) for text in guarded] == [{}, {}]
    unguarded = await answers(LocalSource(path, device=DEVICE, temperature=0, repetition_penalty=1.0, loader=loader))
    assert repeated_4grams(unguarded[1]), "the loop this guard is tested against no longer happens"


def test_what_cannot_join_the_batch_takes_the_plain_path(tiny_model: str) -> None:
    local = source(tiny_model)
    loaded = local.load()

    def reason(sampling: Sampling) -> str | None:
        return local.plain_reason(loaded, local._plan(loaded, sampling))

    assert reason(Sampling()) is None and reason(Sampling(temperature=0.7, max_tokens=3, stop=("x",))) is None
    assert "seed" in reason(Sampling(seed=1))
    assert "logprobs" in reason(Sampling(top_logprobs=2))
    assert "top-k/top-p" in reason(Sampling(top_k=5)) and "top-k/top-p" in reason(Sampling(top_p=0.5))
    assert reason(Sampling(top_p=1.0)) is None
