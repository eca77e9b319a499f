"""A real axon served by the miner, queried by a real ``bt.Dendrite`` over 127.0.0.1."""

import asyncio

import bittensor as bt
import pytest

from tests.dendrite import ask
from tests.fakes import FakeSource

TOKENS = [f"tok{i} " for i in range(30)]


async def test_streams_in_batches(serve_miner, validator) -> None:
    source = FakeSource(TOKENS, interval=0.005)
    miner = serve_miner("--neuron.streaming_batch_size", "4", source=source)
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["hello"])
    assert answer.status == 200
    assert answer.text == "".join(TOKENS) == answer.synapse.completion
    # chunks may coalesce on the wire, but never split a batch: each is whole batches of 4
    assert all(chunk.count("tok") % 4 == 0 for chunk in answer.chunks[:-1])
    assert source.seen[0][-1].content == "hello"


async def test_unregistered_hotkey_gets_403_and_no_tokens(serve_miner, wallets) -> None:
    source = FakeSource(TOKENS)
    miner = serve_miner(source=source)
    async with bt.Dendrite(wallet=wallets("stranger")) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["hello"])
    assert answer.status == 403
    assert answer.text == "" and answer.synapse.completion == ""
    assert "not registered" in answer.synapse.dendrite.status_message
    assert source.seen == []


async def test_bad_synapse_refused_and_miner_keeps_serving(serve_miner, validator) -> None:
    source = FakeSource(TOKENS)
    miner = serve_miner(source=source)
    async with bt.Dendrite(wallet=validator) as dendrite:
        bad = await ask(dendrite, miner.axon, ["user", "assistant"], ["only one"])
        unknown = await ask(dendrite, miner.axon, ["wizard"], ["hi"])
        good = await ask(dendrite, miner.axon, ["user"], ["hello"])
    assert bad.status == 400 and "2 roles for 1 messages" in bad.synapse.dendrite.status_message
    assert unknown.status == 400 and "unknown role" in unknown.synapse.dendrite.status_message
    assert bad.text == unknown.text == ""
    assert good.status == 200 and good.text == "".join(TOKENS)


async def test_no_api_key_answers_from_the_local_model(serve_miner, validator, tiny_model) -> None:
    miner = serve_miner(
        "--fallback.model", tiny_model, "--fallback.device", "cpu", "--fallback.max_new_tokens", "30",
        "--neuron.streaming_batch_size", "5",
    )
    assert miner.source.primary is None and miner.source.local._loaded is not None  # preloaded
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["what is the capital of france ?"])
    assert answer.status == 200
    assert answer.text.strip() and answer.text == answer.synapse.completion
    assert miner.source.answered == {"local": 1}
