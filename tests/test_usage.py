"""Usage through the core: the upstream's own figures (asked for on every stream) or the local
tokenizer's count, in the HTTP front's whole answers, its final stream chunk when asked, and SN78's answers."""

import asyncio
import time

import pytest
from openai_miner.messages import Message

from openai_miner.sources.base import Sampling, Usage
from openai_miner.sources.local import template_chat
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.streaming import stream_answer
from openai_miner.testing.upstream import LoopbackUpstream, usage
from tests.helpers import Http, local_source
from tests.sn78 import CHALLENGE, miner  # noqa: F401  (the SN78 front's fixture)

WORDS = [f"w{i} " for i in range(6)]
MESSAGES = [{"role": "user", "content": "how many words are in this prompt"}]
COUNTED = usage({"messages": MESSAGES}, len(WORDS))  # what the loopback upstream reports of them alone


@pytest.fixture
def served(serve_http):
    def start(up: LoopbackUpstream) -> Http:
        return serve_http("--openai.base_url", up.base_url, "--fallback.off")

    return start


async def test_a_whole_answer_has_the_upstreams_usage(served, validator) -> None:
    with LoopbackUpstream(tokens=WORDS) as up:
        async with served(up).openai(validator) as openai_:
            completion = await openai_.chat.completions.create(model="any", messages=MESSAGES)
        sent = up.requests[0].body
    assert sent["stream_options"] == {"include_usage": True}  # asked for on every stream
    counted = usage(sent, len(WORDS))  # the prompt the upstream got: the system prompt too
    assert completion.usage.model_dump(exclude_none=True) == counted and counted["prompt_tokens"] > 7


async def test_a_stream_ends_with_a_usage_chunk_when_asked(served, validator) -> None:
    with LoopbackUpstream(tokens=WORDS) as up:
        async with served(up).openai(validator) as openai_:
            stream = await openai_.chat.completions.create(
                model="any", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
        counted = usage(up.requests[0].body, len(WORDS))
    *answer, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in answer) == "".join(WORDS)
    assert answer[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in answer)
    assert last.choices == [] and last.usage.model_dump(exclude_none=True) == counted


async def test_a_stream_has_no_usage_chunk_unless_asked(served, validator) -> None:
    with LoopbackUpstream(tokens=WORDS) as up:
        async with served(up).openai(validator) as openai_:
            stream = await openai_.chat.completions.create(model="any", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
    assert all(c.choices and c.usage is None for c in chunks)


async def test_sn78_answers_carry_the_upstreams_usage(miner) -> None:  # noqa: F811
    with LoopbackUpstream(tokens=WORDS) as up:
        source = OpenAISource(chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=64))
        reply = await miner(source).validator().ask(CHALLENGE)
    assert reply.ok, reply
    assert reply.answer["response_text"] == "".join(WORDS) and reply.answer["finish_reason"] == "stop"
    assert reply.usage == usage({"messages": [{"content": CHALLENGE["prompt"]}]}, len(WORDS))


async def test_the_openai_source_reports_the_upstreams_finish_and_usage() -> None:
    with LoopbackUpstream(tokens=WORDS) as up:
        source = OpenAISource(chat_openai(model="loopback", api_key="sk-test", base_url=up.base_url, max_tokens=64))

        async def emit(batch) -> None:
            pass

        result = await stream_answer(
            source, [Message("user", MESSAGES[0]["content"])], emit, batch_size=4, deadline=time.monotonic() + 10
        )
    assert result.tokens == len(WORDS) and result.finish_reason == "stop"
    assert result.usage == Usage(COUNTED["prompt_tokens"], COUNTED["completion_tokens"])


@pytest.mark.parametrize("path", ["batched", "plain"])
async def test_the_local_model_counts_its_own_tokens(tiny_model: str, path: str) -> None:
    """Every token generated counts (the tiny model never stops early: it reaches max_tokens)."""
    local = local_source(tiny_model, max_new_tokens=64)
    loaded = local.load()
    question = [Message("user", "what is the capital of france ?")]
    chat = template_chat(question, tools=False)
    prompt = loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    queue: asyncio.Queue = asyncio.Queue()
    sampling = Sampling(max_tokens=9, seed=3 if path == "plain" else None)
    await local.produce(question, queue, time.monotonic() + 60, sampling)
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    *text, finish = items
    assert text and all(isinstance(item, str) for item in text)
    assert finish.reason == "length" and finish.usage == Usage(len(prompt), 9)
