"""Upstream faults through the real axon and a real ``bt.Dendrite``, checked on both sides.

For every fault the validator must get a well-formed stream (status 200) that ends in time with
the upstream's partial text, the local model's text where the policy says so, or nothing and a
logged reason; the next request must work. The upstream tokens are words the tiny local model
cannot say, so any answer mixing the two models would show.
"""

import asyncio
import shutil
import time
from dataclasses import dataclass

import aiohttp
import bittensor as bt
import httpx
import pytest

from openai_miner.chain import register_mock_neuron
from openai_miner.testing.upstream import Fault, LoopbackUpstream, RecordedRequest
from openai_miner.testing.validator import ask, post_signed
from tests.helpers import (
    FULL, TOKENS, eventually, fallback_active, is_local, is_upstream_prefix, local_flags, local_generating,
    model_loaded,
)

pytestmark = pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")  # wrong-shape chunks

TIMEOUT = 3.0  # the validator's; the miner flushes and ends 0.5 s before it
MARGIN = 0.5


def refused_url() -> str:
    """A base URL nothing listens on: connection refused."""
    up = LoopbackUpstream(tokens=TOKENS).start()
    up.stop()
    return up.base_url


@dataclass(frozen=True)
class Case:
    """A fault, and what the validator gets with the fallback off and with the local model on."""

    fault: Fault | None  # on the case's first request and its retries; the next request is answered whole
    off: str  # "full", "partial", "empty"
    local: str  # the same, or "local"
    attempts: int | None = None  # upstream requests the first answer took
    reason: str | None = None  # in the log when the answer is not the upstream's whole text
    timeout: float = TIMEOUT
    at_deadline: bool = False  # the stream ends at the miner's deadline (closing the upstream's), not before
    kept: int | None = None  # a partial answer is exactly this many upstream tokens
    tokens: tuple[str, ...] = tuple(TOKENS)  # the upstream's answer to the first request


CASES = {
    "429-retry-after": Case(Fault(status=429, retry_after=0.3), "empty", "local", 3, "HTTP 429"),
    "429": Case(Fault(status=429), "empty", "local", 3, "HTTP 429"),
    "500": Case(Fault(status=500), "empty", "local", 3, "HTTP 500"),
    "503": Case(Fault(status=503), "empty", "local", 3, "HTTP 503"),
    "401": Case(Fault(status=401), "empty", "local", 1, "HTTP 401"),
    "400-over-context": Case(Fault(status=400), "empty", "local", 1, "HTTP 400"),
    "drop-before-first-token": Case(Fault(drop_after=0), "empty", "local", 3, "ConnectionError"),
    "drop-mid-stream": Case(Fault(drop_after=5), "partial", "partial", 1, "mid-stream", kept=5),
    "malformed-json-first": Case(Fault(malformed_after=0), "empty", "local", 1, "malformed"),
    "malformed-json-mid-stream": Case(Fault(malformed_after=4), "partial", "partial", 1, "malformed", kept=4),
    "wrong-shape-mid-stream": Case(
        Fault(malformed_after=4, malformed=b'data: {"choices": 7}\n\n'), "partial", "partial", 1, "malformed", kept=4
    ),
    "sse-error-event-mid-stream": Case(
        Fault(malformed_after=4, malformed=b'event: error\ndata: {"error": {"message": "overloaded"}}\n\n'),
        "partial", "partial", 1, "overloaded", kept=4,
    ),
    "empty-completion": Case(None, "empty", "local", 1, "no text", tokens=()),
    "huge-completion": Case(None, "full", "full", 1, tokens=("x" * 2047 + " ",) * 500),  # 1 MB
    "tokens-slower-than-deadline": Case(Fault(interval=0.25), "partial", "partial", 1, timeout=2.0, at_deadline=True),
    "never-sends-done": Case(Fault(no_done=True), "full", "full", 1, timeout=2.0, at_deadline=True),
    "headers-never-come": Case(  # a stalled upstream: the local model answers after half the time left
        Fault(delay_before_headers=30), "empty", "local", 1, timeout=2.0, at_deadline=True
    ),
}
REFUSED = Case(None, "empty", "local", None, "ConnectionError")  # nothing listens at the upstream's address


def asked(body: dict) -> str:
    """The validator's question in an upstream request: ``"<case> first"`` or ``"<case> again"``."""
    return body["messages"][-1]["content"]


def case_fault(body: dict) -> Fault | None:
    name, turn = asked(body).rsplit(" ", 1)
    return CASES[name].fault if turn == "first" else None


def case_tokens(body: dict) -> tuple[str, ...]:
    name, turn = asked(body).rsplit(" ", 1)
    return CASES[name].tokens if turn == "first" else tuple(TOKENS)


def fault_flags(fallback: str, tiny_model: str) -> tuple[str, ...]:
    """A miner for the fault cases: retries 20 ms apart (their timing has tests of its own), every
    answer let through whole, and with the local model a breaker that never opens (every case must
    try the upstream)."""
    local = local_flags(tiny_model, "--fallback.failures", "1000")
    return (
        "--openai.retry_backoff", "0.02", "--openai.max_tokens", "100000", "--neuron.streaming_batch_size", "4",
        *(("--fallback.off",) if fallback == "off" else local),
    )


def check(case: Case, fallback: str, answer, following, requests: list[RecordedRequest], log: str) -> None:
    """What the validator must get for ``case``: ``answer`` to the faulty request, ``following``
    to the next one; ``requests``: the upstream's records of the faulty one (retries included)."""
    took = answer.ended - answer.started
    expected = case.off if fallback == "off" else case.local
    assert answer.status == 200 and answer.synapse.completion == answer.text
    if expected == "full":
        assert answer.text == "".join(case.tokens)
    elif expected == "partial":
        assert answer.text and is_upstream_prefix(answer.text) and answer.text != FULL
        assert case.kept is None or answer.text == "".join(TOKENS[: case.kept])
    elif expected == "empty":
        assert answer.text == ""
    else:
        assert is_local(answer.text)
    if case.attempts is not None:
        assert len(requests) == case.attempts
    if case.reason is not None:
        assert case.reason in log
    deadline = case.timeout - min(MARGIN, case.timeout / 4)
    if case.at_deadline and expected != "local":
        assert deadline - 0.05 <= took < case.timeout
        assert requests[0].disconnected and not requests[0].finished  # the miner closed the upstream request
    else:
        assert took < deadline, took
    assert following.status == 200


@pytest.mark.parametrize("fallback", ["off", "local"])
async def test_every_fault_gives_a_clean_stream_in_time_and_the_next_request_works(
    serve_miner, validator, tiny_model, caplog, subtests, fallback: str
) -> None:
    """One miner and one upstream for every case, one after another: the upstream fails each case's
    first request its own way (chosen by the question) and answers its next one whole."""
    with LoopbackUpstream(tokens=case_tokens, fault=case_fault, interval=0.002) as up, caplog.at_level("WARNING"):
        miner = serve_miner("--openai.base_url", up.base_url, *fault_flags(fallback, tiny_model))
        async with bt.Dendrite(wallet=validator) as dendrite:
            for name, case in CASES.items():
                with subtests.test(msg=name):
                    caplog.clear()
                    answer = await ask(dendrite, miner.axon, ["user"], [f"{name} first"], timeout=case.timeout)
                    requests = [r for r in up.requests if asked(r.body) == f"{name} first"]
                    following = await ask(dendrite, miner.axon, ["user"], [f"{name} again"], timeout=TIMEOUT)
                    await eventually(lambda: all(r.ended_at is not None for r in up.requests), within=1.0)
                    check(case, fallback, answer, following, requests, caplog.text)
                    assert following.text == FULL


@pytest.mark.parametrize("fallback", ["off", "local"])
async def test_an_upstream_refusing_connections_gives_a_clean_stream_in_time(
    serve_miner, validator, tiny_model, caplog, fallback: str
) -> None:
    with caplog.at_level("WARNING"):
        miner = serve_miner("--openai.base_url", refused_url(), *fault_flags(fallback, tiny_model))
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
            following = await ask(dendrite, miner.axon, ["user"], ["hello again"], timeout=TIMEOUT)
    check(REFUSED, fallback, answer, following, [], caplog.text)
    assert following.text == "" if fallback == "off" else is_local(following.text)  # answered as the first was


async def test_retry_after_is_honoured_within_the_deadline(serve_miner, validator) -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=429, retry_after=0.6, times=2)) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off")
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
        received = [r.received_at for r in up.requests]
    gaps = [b - a for a, b in zip(received, received[1:])]
    assert answer.status == 200 and answer.text == FULL
    assert len(received) == 3 and all(gap >= 0.6 for gap in gaps)
    assert answer.ended - answer.started < TIMEOUT - MARGIN


async def test_a_retry_waits_the_backoff_asked(serve_miner, validator) -> None:
    """--openai.retry_backoff 0.6: the one retry comes 0.6 to 1.2 s later (0.25 to 0.5 by default)."""
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=500, times=1)) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--openai.retry_backoff", "0.6")
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
        first, retry = (r.received_at for r in up.requests)
    assert answer.status == 200 and answer.text == FULL
    assert retry - first >= 0.6


@pytest.mark.parametrize("fallback", ["off", "local"])
async def test_a_retry_after_past_the_deadline_is_not_waited_for(
    serve_miner, validator, tiny_model, fallback: str
) -> None:
    """Waiting 30 s cannot fit in a 3 s request: give up at once (and answer locally if possible)."""
    flags = ("--fallback.off",) if fallback == "off" else local_flags(tiny_model)
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=429, retry_after=30)) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--openai.max_retries", "5", *flags)
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
        attempts = len(up.requests)
    assert attempts == 1 and answer.status == 200
    assert answer.ended - answer.started < 1.0
    assert answer.text == "" if fallback == "off" else is_local(answer.text)


async def test_retries_stop_before_the_deadline(serve_miner, validator) -> None:
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=503, retry_after=0.3)) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--openai.max_retries", "100", "--fallback.off")
        async with bt.Dendrite(wallet=validator) as dendrite:
            started = time.monotonic()
            answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=2.0)
        received = [r.received_at - started for r in up.requests]
    assert answer.status == 200 and answer.text == ""
    assert 3 <= len(received) <= 6  # retried every 0.3 s, but only while an attempt fits
    assert received[-1] < 2.0 - MARGIN and answer.ended - started < 2.0


async def test_refused_prompts_do_not_trip_the_circuit_breaker(serve_miner, validator, tiny_model) -> None:
    """A validator sending prompts over the upstream's context must not cut the upstream off for all."""
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=400)) as up:
        miner = serve_miner(
            "--openai.base_url", up.base_url, "--openai.retry_backoff", "0.02",
            *local_flags(tiny_model, "--fallback.failures", "2"),
        )
        async with bt.Dendrite(wallet=validator) as dendrite:
            refused = [await ask(dendrite, miner.axon, ["user"], [f"long {i}"], timeout=TIMEOUT) for i in range(3)]
            assert not fallback_active(miner) and len(up.requests) == 3
            up.fault = Fault(status=500)
            for i in range(2):  # an outage does trip it...
                await ask(dendrite, miner.axon, ["user"], [f"down {i}"], timeout=TIMEOUT)
            tried = len(up.requests)
            skipped = await ask(dendrite, miner.axon, ["user"], ["while open"], timeout=TIMEOUT)
    assert all(a.status == 200 and is_local(a.text) for a in refused)
    assert fallback_active(miner) and len(up.requests) == tried  # ...and then it is skipped
    assert is_local(skipped.text)


# -- the upstream fails every request from the start: the local model must answer all of them ----


async def ask_while_upstream_fails(
    serve_miner, chain, wallets, monkeypatch, caplog, model: str, preload: str, *, validators: int, timeout: float
) -> tuple[list, object, int]:
    """A keyed miner whose upstream answers HTTP 500 to everything, asked by several validators at once."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    wallet_list = [wallets(f"validator-{i}") for i in range(validators)]
    for wallet in wallet_list:
        register_mock_neuron(
            chain, 1, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address,
            stake=1000.0, validator_permit=True,
        )
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(status=500)) as up:
        flags = [
            "--fallback.model", model, "--fallback.device", "cpu", "--fallback.max_new_tokens", "24",
            "--openai.retry_backoff", "0.02",
        ]
        with caplog.at_level("INFO", logger="bittensor"):
            miner = serve_miner("--openai.base_url", up.base_url, *flags, *([] if preload == "default" else [preload]))
            loaded_at_start = model_loaded(caplog.messages, model)  # the log says so before serving
        caplog.clear()  # what follows is what the answers log
        dendrites = [bt.Dendrite(wallet=wallet) for wallet in wallet_list]
        try:
            answers = await asyncio.gather(
                *(ask(d, miner.axon, ["user"], ["What is the capital of France?"], timeout=timeout) for d in dendrites)
            )
        finally:
            for dendrite in dendrites:
                await dendrite.aclose_session()
        attempts = len(up.requests)
    for answer in answers:
        print(f"\npreload {preload}: first chunk {answer.chunk_times[0] - answer.started:.2f}s, {answer.text!r}"
              if answer.chunks else f"\npreload {preload}: nothing")
    return answers, loaded_at_start, attempts


@pytest.mark.parametrize("preload", ["default", "--no-fallback.preload"])
async def test_upstream_failing_every_request_is_answered_locally_lazy_or_preloaded(
    serve_miner, chain, wallets, tiny_model, caplog, monkeypatch, preload: str
) -> None:
    with caplog.at_level("WARNING"):
        answers, loaded_at_start, attempts = await ask_while_upstream_fails(
            serve_miner, chain, wallets, monkeypatch, caplog, tiny_model, preload, validators=3, timeout=60
        )
    lazy = preload != "default"
    assert loaded_at_start is not lazy  # with a key, preloading is the default
    assert attempts == 3 * 3  # each request tried the upstream (and its retries) first
    assert all(a.status == 200 and is_local(a.text) for a in answers)
    assert caplog.text.count("loading the local model") == (1 if lazy else 0)  # once, not per request


@pytest.mark.parametrize("key", ["sk-test-not-a-key", None])
async def test_the_start_up_load_offers_the_lazy_load_only_when_the_upstream_can_answer_meanwhile(
    serve_miner, tiny_model, caplog, monkeypatch, key: str | None
) -> None:
    if key:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    with caplog.at_level("INFO", logger="bittensor"):  # that logger only: torch's stay quiet
        miner = serve_miner("--fallback.model", tiny_model, "--fallback.device", "cpu")
    (line,) = [message for message in caplog.messages if "before serving" in message]
    assert model_loaded(caplog.messages, tiny_model)
    assert ("--no-fallback.preload" in line) is bool(key)  # without a key nothing else could answer


async def test_a_fallback_that_cannot_load_at_start_does_not_stop_a_keyed_miner(
    serve_miner, validator, tiny_model, tmp_path, caplog, monkeypatch
) -> None:
    """Preloading is the default now: a bad --fallback.model must not cost the upstream's uptime."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    model = tmp_path / "model"  # not there at start: a typo, a disk not yet mounted...
    with LoopbackUpstream(tokens=TOKENS) as up, caplog.at_level("INFO", logger="bittensor"):
        miner = serve_miner(
            "--openai.base_url", up.base_url, "--openai.retry_backoff", "0.02",
            "--fallback.model", str(model), "--fallback.device", "cpu",
        )
        assert "failed to load at start" in miner.backend() and not model_loaded(caplog.messages, str(model))
        assert "cannot load the local fallback model" in caplog.text
        async with bt.Dendrite(wallet=validator) as dendrite:
            served = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
            shutil.copytree(tiny_model, model)  # fixed while serving: the next failure loads it
            up.fault = Fault(status=500)
            rescued = await ask(dendrite, miner.axon, ["user"], ["hello again"], timeout=30)
    assert served.status == 200 and served.text == FULL
    assert rescued.status == 200 and is_local(rescued.text) and model_loaded(caplog.messages, str(model))


@pytest.mark.slow
@pytest.mark.parametrize("preload", ["default", "--no-fallback.preload"])
async def test_real_local_model_answers_the_first_failing_requests_lazy_or_preloaded(
    serve_miner, chain, wallets, monkeypatch, caplog, smollm2, preload: str
) -> None:
    """The reported case: key set, upstream 500, two validators at 60 s, SmolLM2 on CPU.

    Lazy, the model loads for real while the validators wait (that load is the case); preloaded,
    the miner's source takes the worker's shared load (the miner loads it at start either way)."""
    import openai_miner.sources.local as local_module

    model, loader = smollm2
    if preload == "default":

        class SharedLoad(local_module.LocalSource):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **{**kwargs, "loader": loader})

        monkeypatch.setattr(local_module, "LocalSource", SharedLoad)
    answers, _, _ = await ask_while_upstream_fails(
        serve_miner, chain, wallets, monkeypatch, caplog, model, preload, validators=2, timeout=60
    )
    assert all(a.status == 200 and a.text.strip() for a in answers)
    assert any("paris" in a.text.lower() for a in answers)


# -- the validator goes away: the miner must stop pulling from the upstream and stop generating ---


def upstream_closed(record: RecordedRequest) -> bool:
    return record.ended_at is not None


async def test_validator_timeout_mid_stream_closes_the_upstream(serve_miner, validator) -> None:
    with LoopbackUpstream(tokens=[f"u{i} " for i in range(200)], interval=0.05) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "1")
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, ["user"], ["talk long"], timeout=1.5)
            await eventually(lambda: upstream_closed(up.requests[0]), within=1.0)
            record = up.requests[0]
            up.tokens = TOKENS
            following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    assert answer.status == 200 and answer.text and "u199" not in answer.text
    assert record.disconnected and not record.finished
    assert record.ended_at - answer.started < 1.5 + 0.3  # closed by the time the validator gave up
    assert len(record.token_times) < 40  # of 200
    assert following.status == 200 and following.text == FULL


async def test_validator_giving_up_mid_stream_closes_the_upstream(serve_miner, validator) -> None:
    """The validator's own task is cancelled long before its timeout: its connection closes."""
    with LoopbackUpstream(tokens=[f"u{i} " for i in range(200)], interval=0.05) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "1")
        async with bt.Dendrite(wallet=validator) as dendrite:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ask(dendrite, miner.axon, ["user"], ["talk long"], timeout=20), 0.8)
            closing = await eventually(lambda: upstream_closed(up.requests[0]), within=2.0)
            up.tokens = TOKENS
            following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    record = up.requests[0]
    print(f"\nupstream closed {closing:.3f}s after the validator gave up")
    assert record.disconnected and not record.finished  # within 2 s of giving up (the eventually above)
    assert len(record.token_times) < 30  # of 200: it stopped, it did not run to the end
    assert following.status == 200 and following.text == FULL


async def long_local_miner(serve_miner, tiny_model):
    miner = serve_miner(
        "--fallback.model", tiny_model, "--fallback.device", "cpu", "--fallback.max_new_tokens", "4000",
        "--neuron.streaming_batch_size", "1",
    )
    return miner


async def test_local_generation_stops_when_the_validator_hangs_up(serve_miner, validator, tiny_model) -> None:
    miner = await long_local_miner(serve_miner, tiny_model)
    dendrite = bt.Dendrite(wallet=validator)
    async with aiohttp.ClientSession() as session:
        response = await post_signed(session, dendrite, miner.axon, ["talk long"])
        assert response.status == 200 and await response.content.readany()
        assert local_generating(miner) == 1
        response.close()  # the validator hangs up mid-answer
    # 4000 tokens take the tiny model many seconds: ending within 2 s is the stop (no tighter bound:
    # a busy machine's scheduling is not the miner's)
    stopped = await eventually(lambda: local_generating(miner) == 0, within=2.0)
    print(f"\nlocal generation stopped {stopped:.3f}s after the hang-up")
    following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=1.0)
    await dendrite.aclose_session()
    assert following.status == 200 and is_local(following.text)


async def test_local_generation_stops_at_the_validator_timeout(serve_miner, validator, tiny_model) -> None:
    miner = await long_local_miner(serve_miner, tiny_model)
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["talk long"], timeout=1.5)
        await eventually(lambda: local_generating(miner) == 0, within=2.0)  # of 4000 tokens: stopped
        following = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=1.0)
    assert answer.status == 200 and is_local(answer.text)
    assert answer.ended - answer.started < 1.5
    assert following.status == 200 and is_local(following.text)


async def test_loopback_fails_each_request_its_own_way() -> None:
    """The loopback's per-request faults, custom malformed line and slow pace, as a client sees them."""
    faults = {
        "refuse": Fault(status=503),
        "garble": Fault(malformed_after=1, malformed=b'data: {"choices": 7}\n\n'),
        "crawl": Fault(interval=0.1),
    }
    with LoopbackUpstream(tokens=TOKENS[:3], fault=lambda body: faults.get(body["messages"][0]["content"])) as up:
        async with httpx.AsyncClient(base_url=up.base_url) as client:

            async def chat(prompt: str) -> httpx.Response:
                body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
                return await client.post("/chat/completions", json=body)

            refused, garbled, crawled, fine = [await chat(p) for p in ("refuse", "garble", "crawl", "fine")]
    assert refused.status_code == 503
    text = garbled.text
    assert text.index('"content":"u0 "') < text.index('data: {"choices": 7}\n\n') < text.index('"content":"u1 "')
    assert crawled.text.endswith("data: [DONE]\n\n") and fine.text.endswith("data: [DONE]\n\n")
    crawl, quick = up.requests[2], up.requests[3]
    assert crawl.token_times[-1] - crawl.token_times[0] >= 0.2 > quick.token_times[-1] - quick.token_times[0]


async def test_a_stalled_upstream_is_answered_locally_and_counted_as_down(serve_miner, chain, wallets, tiny_model) -> None:
    """It takes the request and never sends a token: six validators at once all get local text."""
    from openai_miner.testing.localnet import register_validator

    validators = [wallets(f"v{i}") for i in range(6)]
    for wallet in validators:
        register_validator(chain, wallet)
    with LoopbackUpstream(tokens=TOKENS, fault=Fault(delay_before_headers=60)) as up:
        miner = serve_miner("--openai.base_url", up.base_url, *local_flags(tiny_model, "--fallback.failures", "3"))

        async def one(wallet: bt.Wallet):
            async with bt.Dendrite(wallet=wallet) as dendrite:
                return await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=4.0)

        answers = await asyncio.gather(*(one(wallet) for wallet in validators))
        await eventually(lambda: all(r.disconnected for r in up.requests), within=2.0)
    assert [a.status for a in answers] == [200] * 6 and all(is_local(a.text) for a in answers)
    assert fallback_active(miner)  # six stalls in a row: the upstream counts as down
    assert all(a.ended - a.started < 4.0 - MARGIN for a in answers)


# -- sockets that say nothing ------------------------------------------------------------------------


async def silent_sockets(
    port: int, count: int, address: str = "127.0.0.1"
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0)) for _ in range(count)]


async def test_silent_connections_are_closed_and_validators_still_served(serve_miner, validator) -> None:
    from openai_miner.testing.fake_source import FakeSource
    from openai_miner.testing.localnet import free_port

    miner = serve_miner(
        "--neuron.idle_seconds", "1", "--http.port", str(free_port()), source=FakeSource(TOKENS)
    )
    idle = await silent_sockets(miner.axon.port, 30) + await silent_sockets(miner.config.http.port, 30)
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    assert answer.status == 200 and answer.text == FULL
    closed = await asyncio.gather(*(asyncio.wait_for(reader.read(), 3.0) for reader, _ in idle))
    assert closed == [b""] * 60  # every silent socket was closed by the miner (EOF), none left open
    for _, writer in idle:
        writer.close()


SLOW_HEADER = b"POST /StreamPromptingSynapse HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: "  # never ends


def slow_body(path: str, *headers: str) -> bytes:
    """Whole headers announcing a body of 100 kB, which then comes a byte at a time."""
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json", *headers]
    return ("\r\n".join([*lines, "content-length: 100000"]) + "\r\n\r\n").encode()


async def closed_while_trickling(port: int, head: bytes, within: float) -> float | None:
    """Send ``head``, then a byte every 0.2 s: seconds until the miner closes the connection, or
    ``None`` if it is still open after ``within``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    started = time.monotonic()
    try:
        while time.monotonic() - started < within:
            writer.write(b"a")
            try:
                if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                    return time.monotonic() - started
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - started
        return None
    finally:
        writer.close()


@pytest.mark.parametrize("part", ["headers", "body"])
async def test_a_request_sent_a_byte_at_a_time_is_cut_off_and_validators_still_served(
    serve_miner, validator, part: str
) -> None:
    """Headers or body: the whole request must arrive within --neuron.idle_seconds of its start.

    The slow body claims the validator's hotkey, so the axon's door lets it in to bittensor, which
    waits for the body to check the signature; the HTTP front reads a body before any check.
    """
    from openai_miner.testing.fake_source import FakeSource
    from openai_miner.testing.localnet import free_port

    miner = serve_miner(
        "--neuron.idle_seconds", "1", "--http.port", str(free_port()), source=FakeSource(TOKENS)
    )
    claimed = f"bt_header_dendrite_hotkey: {validator.hotkey.ss58_address}"
    to_axon, to_http = {
        "headers": (SLOW_HEADER, SLOW_HEADER),
        "body": (slow_body("/StreamPromptingSynapse", claimed), slow_body("/v1/chat/completions")),
    }[part]
    slow = asyncio.gather(
        *(closed_while_trickling(miner.axon.port, to_axon, within=4.0) for _ in range(10)),
        *(closed_while_trickling(miner.config.http.port, to_http, within=4.0) for _ in range(10)),
    )
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    assert answer.status == 200 and answer.text == FULL
    closed_after = await slow
    assert None not in closed_after and max(closed_after) < 2.5, closed_after  # bytes kept coming: cut at ~1 s


async def test_silent_sockets_past_the_connection_cap_never_lock_a_validator_out(serve_miner, validator) -> None:
    """Each front keeps --neuron.max_connections places; a silent socket gives its place to a
    newcomer, so a validator is served with ten times the cap held open by sockets that say nothing.
    They dial from an address of their own: one whose silent sockets keep being closed for newcomers
    is cut off, as any address refused too often."""
    from openai_miner.testing.fake_source import FakeSource
    from openai_miner.testing.localnet import free_port
    from openai_miner.testing.validator import openai_client

    miner = serve_miner(
        "--neuron.max_connections", "3", "--http.port", str(free_port()), source=FakeSource(TOKENS)
    )
    idle = [
        *await silent_sockets(miner.axon.port, 30, "127.0.0.2"),
        *await silent_sockets(miner.config.http.port, 30, "127.0.0.2"),
    ]
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    receiver = miner.wallet.hotkey.ss58_address
    async with openai_client(miner.config.http.port, validator.hotkey, receiver) as client:
        reply = await client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    assert answer.status == 200 and answer.text == FULL
    assert reply.choices[0].message.content == FULL
    for _, writer in idle:
        writer.close()


# -- a stranger's flood ------------------------------------------------------------------------------


async def test_a_strangers_requests_are_refused_before_bittensor_signs_them(serve_miner, validator, wallets, monkeypatch) -> None:
    """bittensor's middleware signs every request it parses with the miner's hotkey (sr25519):
    a refused hotkey must not get that far."""
    from bittensor.core.axon import AxonMiddleware

    from openai_miner.testing.fake_source import FakeSource

    parsed: list[str] = []
    preprocess = AxonMiddleware.preprocess

    async def counting(self, request):
        parsed.append(request.url.path)
        return await preprocess(self, request)

    monkeypatch.setattr(AxonMiddleware, "preprocess", counting)
    miner = serve_miner(source=FakeSource(TOKENS))
    async with bt.Dendrite(wallet=wallets("stranger")) as stranger:
        refused = [await ask(stranger, miner.axon, ["user"], ["hello"], timeout=TIMEOUT) for _ in range(20)]
    assert all(a.status == 403 and "not registered" in a.message for a in refused) and parsed == []
    async with bt.Dendrite(wallet=validator) as dendrite:
        served = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    assert served.status == 200 and served.text == FULL and len(parsed) == 1


async def test_an_unsigned_request_gets_403_not_500(serve_miner) -> None:
    from openai_miner.testing.fake_source import FakeSource

    miner = serve_miner(source=FakeSource(TOKENS))
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{miner.axon.port}/StreamPromptingSynapse",
            json={"roles": ["user"], "messages": ["hi"]}, headers={"X-Secret-Looking": "sk-123"},
        )
    assert response.status_code == 403 and "no hotkey" in response.text and "sk-123" not in response.text


async def test_an_address_refused_past_the_rate_is_cut_off_on_both_fronts_and_validators_still_served(
    serve_miner, validator
) -> None:
    from openai_miner.testing.fake_source import FakeSource
    from openai_miner.testing.localnet import free_port

    miner = serve_miner(
        "--blacklist.max_refusals_per_second", "5", "--http.port", str(free_port()), source=FakeSource(TOKENS)
    )
    got: list[object] = []
    stranger = httpx.AsyncHTTPTransport(local_address="127.0.0.2")  # not the validator's address
    async with httpx.AsyncClient(transport=stranger) as client:
        for _ in range(30):
            try:
                response = await client.post(
                    f"http://127.0.0.1:{miner.axon.port}/StreamPromptingSynapse",
                    json={"roles": ["user"], "messages": ["hi"]},
                )
                got.append(response.status_code)
            except httpx.TransportError as error:
                got.append(type(error).__name__)
        with pytest.raises(httpx.TransportError):  # the HTTP front closes its connections too
            await client.get(f"http://127.0.0.1:{miner.config.http.port}/health")
    assert got[:10] == [403] * 10 and 403 not in got[11:], got  # a burst of twice the rate, then closed unread
    async with bt.Dendrite(wallet=validator) as dendrite:
        answer = await ask(dendrite, miner.axon, ["user"], ["hello"], timeout=TIMEOUT)
    assert answer.status == 200 and answer.text == FULL


def test_refusals_are_logged_as_one_summary_line(caplog) -> None:
    from openai_miner.access import Refusals

    now = [0.0]
    refusals = Refusals(every=10.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="bittensor"):
        for tick in range(2001):
            now[0] = tick / 100  # 2,001 refusals, one every 10 ms, over 20 s
            refusals.count("hotkey X is not registered on this subnet")
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and "refused 1001 requests in 10s, most: hotkey X" in lines[0].getMessage()


# -- bodies too large ----------------------------------------------------------------------------------


async def test_a_body_over_the_cap_gets_413_and_one_of_no_declared_length_411(serve_miner, validator) -> None:
    from openai_miner.testing.fake_source import FakeSource

    source = FakeSource(TOKENS)
    miner = serve_miner("--neuron.max_body_bytes", "100000", source=source)
    async with bt.Dendrite(wallet=validator) as dendrite:
        big = await ask(dendrite, miner.axon, ["user"], ["x" * 200_000], timeout=TIMEOUT)
        small = await ask(dendrite, miner.axon, ["user"], ["x" * 50_000], timeout=TIMEOUT)
    assert big.status == 413 and "over 100000 bytes" in big.message, (big.status, big.message)
    assert small.status == 200 and small.text == FULL

    async def chunks():  # no Content-Length: a dendrite always sends one
        for _ in range(30):
            yield b"x" * 10_000

    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{miner.axon.port}/StreamPromptingSynapse", content=chunks(),
            headers={"bt_header_dendrite_hotkey": validator.hotkey.ss58_address},
        )
    assert response.status_code == 411 and "Content-Length" in response.text
    assert len(source.seen) == 1  # only the small one reached the model
