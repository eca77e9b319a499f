"""A real axon served by the miner, queried by a real ``bt.Dendrite`` over 127.0.0.1."""

import asyncio

import bittensor as bt
import pytest

from openai_miner.testing.validator import ask, post_signed
from openai_miner.testing.fake_source import FakeSource
from tests.helpers import eventually

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
    assert miner.can_answer() and miner.backend().startswith("local")  # no upstream; preloaded
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["what is the capital of france ?"])
    assert answer.status == 200
    assert answer.text.strip() and answer.text == answer.synapse.completion
    assert miner.core.stats.answers == {("local", "complete"): 1}


async def test_sixteen_concurrent_streams_are_served_side_by_side(serve_miner, chain, wallets) -> None:
    """The drain never blocks the axon's loop (SN1's miner took ~N times as long for N streams).

    Checked by order, not by the clock: every stream's first chunk reaches its validator, and every
    upstream request has started, before any answer ends. Streams served one after another (or a
    loop blocked while one drains) would end the first answer before the last one starts.
    """
    from openai_miner.chain import register_mock_neuron
    from openai_miner.testing.upstream import LoopbackUpstream

    validators = [wallets(f"v{i}") for i in range(16)]
    for wallet in validators:
        register_mock_neuron(
            chain, 1, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address,
            stake=10.0, validator_permit=True,
        )
    tokens = [f"t{i} " for i in range(30)]
    with LoopbackUpstream(tokens=tokens, interval=0.04) as up:  # 1.2 s an answer
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "3")
        dendrites = [bt.Dendrite(wallet=wallet) for wallet in validators]
        try:
            await ask(dendrites[0], miner.axon, ["user"], ["warm up"])
            warm = len(up.requests)
            answers = await asyncio.gather(
                *(ask(d, miner.axon, ["user"], [f"q{i}"]) for i, d in enumerate(dendrites))
            )
        finally:
            for dendrite in dendrites:
                await dendrite.aclose_session()
        upstream = up.requests[warm:]
    assert all(a.status == 200 and a.text == "".join(tokens) for a in answers)
    first_end = min(a.ended for a in answers)
    print(f"\nlast first chunk {max(a.chunk_times[0] for a in answers) - first_end:+.3f}s from the first end")
    assert all(a.chunk_times[0] < first_end for a in answers)
    assert len(upstream) == 16 and max(r.received_at for r in upstream) < min(r.ended_at for r in upstream)


async def test_api_key_never_logged_or_shown(serve_miner, validator, caplog, monkeypatch) -> None:
    from openai_miner.testing.upstream import Fault, LoopbackUpstream

    secret = "sk-test-5ecret-never-shown"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    bt.logging.set_debug(True)
    try:
        with LoopbackUpstream(tokens=["hi"], fault=Fault(status=401)) as up, caplog.at_level("DEBUG"):
            miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off")
            async with bt.Dendrite(wallet=validator) as dendrite:
                answer = await ask(dendrite, miner.axon, ["user"], ["hello"])
            sent = up.requests[0].headers["authorization"]
    finally:
        bt.logging.set_debug(False)
    assert answer.status == 200 and answer.text == ""  # upstream refused: a clean, empty answer
    assert "401" in caplog.text
    assert sent == f"Bearer {secret}"  # the key is used...
    shown = caplog.text + repr(vars(miner)) + str(miner.config) + repr(miner.source.model) + miner.backend()
    assert secret not in shown  # ...and never shown


async def test_validator_hanging_up_closes_the_upstream_request(serve_miner, validator) -> None:
    """Checked on the upstream's side: the miner stops pulling tokens nobody will read."""
    import aiohttp

    from openai_miner.testing.upstream import LoopbackUpstream

    with LoopbackUpstream(tokens=[f"t{i} " for i in range(200)], interval=0.05) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "1")
        dendrite = bt.Dendrite(wallet=validator)
        async with aiohttp.ClientSession() as session:
            response = await post_signed(session, dendrite, miner.axon, ["talk long"])
            assert await response.content.readany() == b"t0 "
            response.close()  # the validator hangs up after the first chunk
        await eventually(lambda: up.requests[0].disconnected, within=3.0)
        recorded = up.requests[0]
        await dendrite.aclose_session()
    assert recorded.disconnected and not recorded.finished
    assert len(recorded.token_times) < 20  # of 200: it stopped, it did not run to the end


async def test_one_hotkey_is_rate_limited_after_its_signature_is_checked(serve_miner, validator, wallets, chain, caplog) -> None:
    from openai_miner.chain import register_mock_neuron

    other = wallets("other-validator")
    register_mock_neuron(chain, 1, other.hotkey.ss58_address, other.coldkeypub.ss58_address, stake=5.0, validator_permit=True)
    miner = serve_miner("--blacklist.max_requests_per_minute", "2", source=FakeSource(["ok"]))
    async with bt.Dendrite(wallet=validator) as greedy, bt.Dendrite(wallet=other) as polite:
        answers = [await ask(greedy, miner.axon, ["user"], [f"q{i}"]) for i in range(3)]
        fine = await ask(polite, miner.axon, ["user"], ["q"])
    assert [a.status for a in answers] == [200, 200, 429]
    assert "requests in a minute" in answers[2].synapse.dendrite.status_message and answers[2].text == ""
    assert fine.status == 200 and fine.text == "ok"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # in the refusal summary, not a line each


async def test_axon_keeps_idle_connections_longer_than_the_dendrite(serve_miner, validator) -> None:
    """uvicorn's 5 s default closes connections aiohttp still reuses (ServerDisconnectedError)."""
    miner = serve_miner(source=FakeSource(["ok"]))
    assert miner.axon.fast_server.config.timeout_keep_alive > 15


async def test_prompt_fills_the_completion_through_the_same_drain(serve_miner) -> None:
    import fastapi

    from openai_miner.protocol import StreamPromptingSynapse

    miner = serve_miner("--neuron.streaming_batch_size", "4", source=FakeSource(TOKENS))
    answered = await miner.prompt(StreamPromptingSynapse(roles=["user"], messages=["hello"]))
    assert answered.completion == "".join(TOKENS)
    with pytest.raises(fastapi.HTTPException, match="unknown role"):
        await miner.prompt(StreamPromptingSynapse(roles=["wizard"], messages=["hello"]))
