"""The core every front drives: questions in, batches out, one count per answer; and its access policy."""

from typing import Sequence

import pytest

from openai_miner.access import Access, AccessPolicy, RateLimiter, RecentPrompts
from openai_miner.chain import Neuron, Registry
from openai_miner.core import Core, Question
from openai_miner.messages import InvalidPrompt
from openai_miner.sources.base import Sampling, Token
from openai_miner.system_prompts import SystemPrompts
from openai_miner.testing.fake_source import FakeSource
from tests.helpers import far

VALIDATOR = Neuron(uid=0, hotkey="validator", stake=10.0, validator_permit=True)


def access(per_minute: int = 600, repeat_window: float = 0.0) -> Access:
    return Access(AccessPolicy(), Registry.of([VALIDATOR]), RateLimiter(per_minute), RecentPrompts(repeat_window))


def core(source: FakeSource, **kwargs) -> Core:
    prompts = SystemPrompts({"generic": "Be brief.", "math": "Show the number."})
    return Core(source, access(), prompts, batch_size=2, **kwargs)


class Batches:
    def __init__(self) -> None:
        self.batches: list[list[str | Token]] = []

    async def __call__(self, batch: Sequence[str | Token]) -> None:
        self.batches.append(list(batch))


async def test_answer_streams_batches_passes_sampling_and_counts() -> None:
    source = FakeSource(["a", "b", "c"])
    answering = core(source)
    emit = Batches()
    sampling = Sampling(temperature=0.1, max_tokens=3)
    messages = answering.chat(["user"], ["hi"], "math")
    result = await answering.answer(Question(messages, far(), "validator", sampling), emit)
    assert result.outcome == "complete" and emit.batches == [["a", "b"], ["c"]]
    assert source.sampling == [sampling]
    assert source.seen[0][0].content == "Show the number."  # the task's system prompt comes first
    assert answering.stats.answers == {("fake", "complete"): 1} and answering.stats.tokens == 3


async def test_a_failed_answer_is_counted_and_may_stop_the_miner() -> None:
    stopped: list[bool] = []
    answering = core(FakeSource(["a"], fail_after=0), on_failure=lambda: stopped.append(True))
    result = await answering.answer(Question(answering.chat(["user"], ["hi"], None), far()), Batches())
    assert result.outcome == "error" and answering.stats.by_outcome() == {"error": 1} and stopped == [True]


def test_chat_without_template_sends_messages_untouched_and_refuses_bad_ones() -> None:
    answering = core(FakeSource([]))
    assert [m.content for m in answering.chat(["user"], ["hi"], "math", templated=False)] == ["hi"]
    with pytest.raises(InvalidPrompt):
        answering.chat(["wizard"], ["hi"], None)


def test_deadline_counts_from_arrival_with_the_margin() -> None:
    answering = core(FakeSource([]), deadline_margin=0.5)
    assert answering.deadline(10.0, arrived=100.0) == pytest.approx(109.5)


def test_access_refuses_before_signatures_and_limits_after() -> None:
    gate = access(per_minute=1, repeat_window=60.0)
    assert gate.refusal("stranger").status == 403 and "not registered" in gate.refusal("stranger").reason
    assert gate.refusal(None).status == 403
    assert gate.refusal("validator") is None
    assert gate.admit("validator", ["q"]) is None
    limited = gate.admit("validator", ["other"])
    assert limited is not None and limited.status == 429 and "requests in a minute" in limited.reason
    repeat = access(repeat_window=60.0)
    assert repeat.admit("validator", ["q"]) is None and repeat.admit("validator", ["q"]).status == 429
