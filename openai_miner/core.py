"""What every answer needs, whichever front asked: one :class:`Core` per miner.

A front turns its request into a :class:`Question` (chat messages, deadline, sampling, caller)
and an :data:`~openai_miner.streaming.Emit` that writes batches in its wire format; the core asks
the token source through the one drain, logs how it went and counts it. The core also holds
what the fronts decide with: the access policy (:class:`~openai_miner.access.Access`), the
system prompts, the deadline rule and the prompt size limit.
"""

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import bittensor as bt

from openai_miner import sources
from openai_miner.access import Access
from openai_miner.budget import DailyBudget
from openai_miner.config import add_bool, at_least
from openai_miner.messages import InvalidPrompt, Message, to_chat_messages
from openai_miner.metrics import Metrics
from openai_miner.sources.base import DEFAULT_SAMPLING, Sampling, TokenSource, closed
from openai_miner.streaming import Emit, Outcome, StreamResult, stream_answer, stream_deadline
from openai_miner.system_prompts import SystemPrompts
from openai_miner.tally import Tally


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--neuron.streaming_batch_size", type=at_least(1), default=12,
        help="Tokens per streamed chunk (SN1 validators penalise chunks over 200 tokens).",
    )
    add_bool(
        parser, "--neuron.stop_on_forward_exception", default=False,
        help="Stop the miner when answering a request fails.",
    )
    parser.add_argument(
        "--neuron.deadline_margin", type=at_least(0, float), default=0.5,
        help="Seconds before the validator's timeout at which the answer so far is flushed.",
    )
    parser.add_argument(
        "--neuron.max_prompt_chars", type=at_least(1), default=100_000,
        help="Refuse conversations longer than this many characters.",
    )
    parser.add_argument(
        "--neuron.max_messages", type=at_least(1), default=1024,
        help="Refuse conversations of more messages than this (each costs time on the event loop).",
    )
    add_bool(
        parser, "--neuron.log_answers", default=True,
        help="Log one line per answer at the default level (front, caller, source, tokens, time to first "
        "chunk, outcome); off for a busy miner, which still logs a summary of its answers every minute.",
    )


class Refused(Exception):
    """A request turned away before any model work: the HTTP status and the reason for the caller.
    Each front answers it in its own wire's shape and counts it (``Access.refused``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Question:
    """One request as the core sees it, whatever its wire format."""

    messages: Sequence[Message]
    deadline: float  # time.monotonic()
    hotkey: str | None = None
    sampling: Sampling = DEFAULT_SAMPLING
    batch_size: int | None = None  # tokens per emitted batch; None: the miner's --neuron.streaming_batch_size
    front: str | None = None  # the front that asked (its name), for the answer's log line


@dataclass
class Stats:
    """The answers a core gave, by the source that answered and how each ended, and the tokens sent.

    By source as well as outcome: after an outage, which model answered is the first question.
    """

    answers: Counter[tuple[str, Outcome]] = field(default_factory=Counter)
    tokens: int = 0

    def count(self, result: StreamResult) -> None:
        self.answers[result.source, result.outcome] += 1
        self.tokens += result.tokens

    def by_outcome(self) -> Counter[str]:
        """Answers by outcome (``"complete"``, ``"deadline"``...), whichever source gave them."""
        counts: Counter[str] = Counter()
        for (_, outcome), count in self.answers.items():
            counts[outcome] += count
        return counts

    def by_source(self, outcome: Outcome | None = None) -> Counter[str]:
        """Answers by source, of one ``outcome`` or of all."""
        counts: Counter[str] = Counter()
        for (source, ended), count in self.answers.items():
            if outcome is None or ended == outcome:
                counts[source] += count
        return counts

    def as_json(self) -> dict[str, Any]:
        """What ``/health`` reports: answers by outcome, by source and outcome, tokens in all."""
        by_source: dict[str, dict[str, int]] = {}
        for (source, outcome), count in self.answers.items():
            by_source.setdefault(source, {})[outcome] = count
        return {**self.by_outcome(), "tokens": self.tokens, "by_source": by_source}


class Core:
    """The token source, the drain, the access policy and the answer statistics, for every front."""

    def __init__(
        self,
        source: TokenSource,
        access: Access,
        system_prompts: SystemPrompts,
        *,
        batch_size: int = 12,
        deadline_margin: float = 0.5,
        max_prompt_chars: int = 100_000,
        max_messages: int = 1024,
        on_failure: Callable[[], None] | None = None,
        log_answers: bool = True,
        tally: Tally | None = None,
        budget: DailyBudget | None = None,
    ) -> None:
        self.source = source
        self.access = access
        self.system_prompts = system_prompts
        self.batch_size = batch_size
        self.deadline_margin = deadline_margin
        self.max_prompt_chars = max_prompt_chars
        self.max_messages = max_messages
        self.on_failure = on_failure
        self.log_answers = log_answers
        self.budget = budget
        self.stats = Stats()

        def refusals() -> Mapping[str, int]:  # read at each scrape and each summary line
            return access.refusals.totals

        self.metrics = Metrics(
            refusals=refusals,
            fallback_active=sources.fallback_active(source),
            upstream_errors=sources.upstream_errors(source),
            local_load=sources.local_load(source),
            budget=budget,
        )
        self.tally = tally or Tally(fallback=sources.fallback_name(source), refusals=refusals)

    @classmethod
    def from_config(
        cls,
        config: bt.Config,
        source: TokenSource,
        access: Access,
        system_prompts: SystemPrompts,
        on_failure: Callable[[], None],
        budget: DailyBudget | None = None,
    ) -> "Core":
        neuron = config.neuron
        return cls(
            source, access, system_prompts,
            batch_size=neuron.streaming_batch_size,
            deadline_margin=neuron.deadline_margin,
            max_prompt_chars=neuron.max_prompt_chars,
            max_messages=neuron.max_messages,
            on_failure=on_failure if neuron.stop_on_forward_exception else None,
            log_answers=neuron.log_answers,
            budget=budget,
        )

    def chat(
        self,
        roles: Sequence[str],
        contents: Sequence[str],
        task: str | None,
        *,
        templated: bool = True,
        extras: Sequence[Mapping[str, Any]] = (),
    ) -> list[Message]:
        """Chat messages under the task's system prompt (none when not ``templated``); ``extras``:
        each message's tool-conversation fields (see :func:`~openai_miner.messages.to_chat_messages`).

        Raises :class:`~openai_miner.messages.InvalidPrompt` with the reason for the caller.
        """
        return to_chat_messages(
            roles, contents,
            system_prompt=self.system_prompts.for_task(task) if templated else None,
            max_chars=self.max_prompt_chars,
            max_messages=self.max_messages,
            extras=extras,
        )

    def question(
        self,
        hotkey: str,
        roles: Sequence[str],
        contents: Sequence[str],
        task: str | None,
        *,
        timeout: float | None,
        arrived: float,
        sampling: Sampling = DEFAULT_SAMPLING,
        templated: bool = True,
        extras: Sequence[Mapping[str, Any]] = (),
        batch_size: int | None = None,
        invalid: str = "invalid prompt",
        front: str | None = None,
    ) -> Question:
        """A proven caller's request as a :class:`Question`: the steps every front takes once the
        signature (or the decryption) showed who asks, in one place so that they cannot drift apart:
        whether anything can answer now (503: the upstream's budget spent, no local model), the
        hotkey's rate limit and recent repeats (429), then the chat messages (400,
        ``"{invalid}: why"``), then the deadline counted from ``arrived``. Raises :class:`Refused`.

        The steps before, cheapest first, are the front's: its body limit, the access policy on the
        claimed hotkey (``Access.refusal``, before any signature work), its signature or decryption.
        """
        shut = self.closed()
        if shut is not None:
            raise Refused(503, shut)
        limited = self.access.admit(hotkey, contents)
        if limited is not None:
            raise Refused(limited.status, limited.reason)
        try:
            messages = self.chat(roles, contents, task, templated=templated, extras=extras)
        except InvalidPrompt as why:
            raise Refused(400, f"{invalid}: {why}") from None
        return Question(messages, self.deadline(timeout, arrived), hotkey, sampling, batch_size=batch_size, front=front)

    def closed(self) -> str | None:
        """Why no request can be answered now (``None``: they can), said before any work."""
        return closed(self.source)

    def deadline(self, timeout: float | None, arrived: float | None = None) -> float:
        """When to stop sending an answer to a request that arrived at ``arrived`` (default: now)."""
        return stream_deadline(
            timeout, now=time.monotonic() if arrived is None else arrived, margin=self.deadline_margin
        )

    async def answer(self, question: Question, emit: Emit) -> StreamResult:
        """Stream the source's answer through the drain to ``emit``, then log and count it."""
        started = time.monotonic()
        result = await stream_answer(
            self.source, question.messages, emit,
            batch_size=question.batch_size or self.batch_size,
            deadline=question.deadline,
            sampling=question.sampling,
        )
        self.report(result, question, time.monotonic() - started)
        return result

    def report(self, result: StreamResult, question: Question, duration: float) -> None:
        """One log line per answer (info, or debug under ``--no-neuron.log_answers``; no prompt in
        it); an error is a warning, and may stop the miner if configured."""
        self.stats.count(result)
        self.tally.count(result, duration)
        front = question.front or "core"
        self.metrics.observe(front, result.outcome, result.source, result.tokens, result.first_chunk, duration)
        who = question.hotkey[:10] if question.hotkey else "local"
        first = "-" if result.first_chunk is None else f"{result.first_chunk:.2f}s"
        line = (
            f"{front} {who}: {result.tokens} tokens in {result.sends} chunks via "
            f"{result.source} ({result.outcome}), first chunk {first}, {duration:.2f}s"
        )
        if result.outcome == "deadline" and result.tokens == 0:
            bt.logging.warning(f"{line}: nothing arrived from the model before the deadline")
            return
        if result.outcome != "error":
            (bt.logging.info if self.log_answers else bt.logging.debug)(line)
            return
        when = "before the first token" if result.tokens == 0 else "mid-stream"
        bt.logging.warning(f"{line}: upstream failed {when}: {result.error}")
        if self.on_failure is not None:
            bt.logging.error("stopping: --neuron.stop_on_forward_exception is set")
            self.on_failure()

