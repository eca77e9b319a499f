"""Recorded OpenAI traffic replayed through the miner (vcrpy; no network, no key).

Re-record: see README ("Cassettes"). Timing is never tested here: a replay delivers every chunk
at once.
"""

import math
import time

import pytest

from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.sources.base import UpstreamError
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.streaming import stream_answer
from openai_miner.messages import to_chat_messages
from tests.cassettes import CASSETTES, SECRET_HEADERS, streamed_text
from tests.helpers import Recorder


def source(base_url: str, key: str) -> OpenAISource:
    model = chat_openai(model="gpt-4o-mini", api_key=key, base_url=base_url, temperature=0, max_tokens=48)
    return OpenAISource(model, max_retries=0)


@pytest.mark.vcr
@pytest.mark.parametrize("batch", [1, 5, 12])
async def test_recorded_stream_is_batched_exactly(vcr, cassette_upstream, batch: int) -> None:
    messages = to_chat_messages(["user"], ["What is the capital of France? Two sentences."], system_prompt="Be brief.")
    send = Recorder()
    result = await stream_answer(
        source(*cassette_upstream()), messages, send.emit, batch_size=batch, deadline=time.monotonic() + 30
    )
    expected = streamed_text(vcr.responses[0]["body"]["string"])
    assert vcr.play_count == 1 or vcr.write_protected is False
    assert result.outcome == "complete" and expected
    assert send.text == expected
    assert len(send.messages) == math.ceil(result.tokens / batch)
    # the stream was asked for its usage: the upstream's own count, past the last token
    assert result.finish_reason == "stop" and result.usage is not None
    assert result.usage.completion_tokens == result.tokens and result.usage.prompt_tokens > 0


@pytest.mark.vcr
async def test_recorded_conversation_history_is_sent_whole(vcr, cassette_upstream) -> None:
    """The JSON-body matcher replays this only if every role and message is mapped as recorded."""
    synapse = StreamPromptingSynapse(
        roles=["system", "user", "assistant", "user"],
        messages=["You answer in one line.", "Name a French city.", "Paris ", "Another one?"],
    )
    messages = to_chat_messages(synapse.roles, synapse.messages, system_prompt="ignored: the synapse has one")
    send = Recorder()
    result = await stream_answer(
        source(*cassette_upstream()), messages, send.emit, batch_size=12, deadline=time.monotonic() + 30
    )
    assert vcr.play_count == 1 or vcr.write_protected is False
    assert result.outcome == "complete"
    body = vcr.requests[0].body
    assert b'"assistant"' in body and b"ignored" not in body


@pytest.mark.vcr
async def test_recorded_auth_failure_is_a_clean_empty_answer(vcr, cassette_upstream) -> None:
    messages = to_chat_messages(["user"], ["hello"])
    send = Recorder()
    result = await stream_answer(
        source(*cassette_upstream(rejects_key=True)), messages, send.emit, batch_size=12,
        deadline=time.monotonic() + 30,
    )
    assert result.outcome == "error" and isinstance(result.error, UpstreamError)
    assert "401" in str(result.error) and send.messages == []


def test_cassettes_hold_no_credentials() -> None:
    cassettes = sorted(CASSETTES.glob("*.yaml"))
    assert cassettes, "no cassettes recorded"
    for cassette in cassettes:
        text = cassette.read_text("utf-8").lower()
        for header in SECRET_HEADERS:
            assert f"{header}:" not in text, f"{cassette.name} records {header}"
        assert "sk-" not in text, f"{cassette.name} holds something shaped like a key"
