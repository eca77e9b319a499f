"""The validator's view, end to end: a real axon served by the miner, real ``bt.Dendrite``s, the mock
chain, and the loopback OpenAI-compatible server as the upstream, all on 127.0.0.1.

Also the start-up failures of the ``openai-miner`` command (issue 4): each one exits with its
documented code and a message saying why and what to do, before serving anything.
"""

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import aiohttp
import bittensor as bt
import pytest

from openai_miner import cli
from openai_miner.chain import register_mock_neuron
from openai_miner.testing.upstream import LoopbackUpstream
from openai_miner.miner import OpenAIMiner
from openai_miner.startup import NotRegistered
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.testing.localnet import NETUID, free_port, make_wallet, miner_argv
from openai_miner.testing.process import MinerProcess
from openai_miner.testing.validator import Answer, ask
from openai_miner.testing.fake_source import FakeSource
from tests.helpers import cli_env

WORDS = [f"w{i:02d} " for i in range(42)]  # unique, so order and batching are visible in the text
TEXT = "".join(WORDS)
MINER_CLI = str(Path(sys.executable).with_name("openai-miner"))


@pytest.fixture
def upstream() -> LoopbackUpstream:
    with LoopbackUpstream(tokens=WORDS, interval=0.002) as up:
        yield up


@pytest.fixture
def serve_upstream(serve_miner, upstream) -> Callable[..., OpenAIMiner]:
    """A miner answering from the loopback upstream only (no key, no local model)."""
    return lambda *extra: serve_miner("--openai.base_url", upstream.base_url, "--fallback.off", *extra)


def registered(chain, wallet: bt.Wallet, *, permit: bool = True, stake: float = 1000.0) -> bt.Wallet:
    register_mock_neuron(
        chain, NETUID, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address,
        stake=stake, validator_permit=permit,
    )
    return wallet


async def query(wallet: bt.Wallet, miner: OpenAIMiner, message: str = "hello", **kwargs) -> Answer:
    async with bt.Dendrite(wallet=wallet) as dendrite:
        return await ask(dendrite, miner.axon, ["user"], [message], **kwargs)


def subtensor_class(make: Callable[..., object]) -> type:
    """Stands in for ``bt.Subtensor``: its flags are the real ones, constructing it calls ``make``."""

    class Subtensor:
        add_args = staticmethod(bt.Subtensor.add_args)

        def __new__(cls, *args, **kwargs):
            return make(*args, **kwargs)

    return Subtensor


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


# -- what a validator receives ---------------------------------------------------------------------


async def test_chunks_stream_in_order_in_batches_of_the_configured_size(serve_upstream, validator, upstream) -> None:
    miner = serve_upstream("--neuron.streaming_batch_size", "5")
    answer = await query(validator, miner)
    assert answer.status == 200
    assert answer.text == TEXT == answer.synapse.completion
    assert len(answer.chunks) > 1  # streamed, not sent whole
    # Chunks may coalesce on the wire but never split a batch: whole batches of 5 words, except
    # the last, which ends with the remainder (42 = 8 * 5 + 2).
    counts = [len(chunk.split()) for chunk in answer.chunks]
    assert all(count % 5 == 0 for count in counts[:-1]), counts
    assert counts[-1] % 5 == 2, counts
    assert answer.chunk_times == sorted(answer.chunk_times)
    assert len(upstream.requests) == 1 and upstream.requests[0].body["messages"][-1]["content"] == "hello"


async def test_unregistered_hotkey_gets_403_and_the_upstream_is_never_called(
    serve_upstream, wallets, upstream
) -> None:
    miner = serve_upstream()
    answer = await query(wallets("stranger"), miner)
    assert answer.status == 403
    assert answer.chunks == [] and answer.synapse.completion == ""
    assert "not registered" in answer.synapse.dendrite.status_message
    assert upstream.requests == []


async def test_registered_hotkey_without_validator_permit_is_refused_by_default(
    serve_upstream, chain, wallets, upstream
) -> None:
    miner_wallet = registered(chain, wallets("no-permit"), permit=False)
    miner = serve_upstream()
    answer = await query(miner_wallet, miner)
    assert answer.status == 403
    assert "no validator permit" in answer.synapse.dendrite.status_message
    assert answer.chunks == [] and upstream.requests == []


async def test_whitelisted_hotkey_is_served_even_unregistered(serve_upstream, wallets) -> None:
    friend = wallets("friend")
    miner = serve_upstream("--blacklist.whitelist", friend.hotkey.ss58_address)
    answer = await query(friend, miner)
    assert answer.status == 200 and answer.text == TEXT


async def test_a_replayed_request_gets_401(serve_upstream, validator, upstream) -> None:
    miner = serve_upstream()
    async with bt.Dendrite(wallet=validator) as dendrite:
        synapse = dendrite.preprocess_synapse_for_request(
            miner.axon.info(), StreamPromptingSynapse(roles=["user"], messages=["hello"]), 10.0
        )
    url = f"http://127.0.0.1:{miner.axon.port}/StreamPromptingSynapse"
    headers, body = synapse.to_headers(), synapse.model_dump()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, headers=headers, json=body) as first:
            first_status, first_body = first.status, await first.text()
        async with session.post(url, headers=headers, json=body) as replay:
            replay_status, replay_body = replay.status, await replay.text()
    assert first_status == 200 and first_body == TEXT
    assert replay_status == 401, replay_body
    assert "nonce" in replay_body.lower()
    assert len(upstream.requests) == 1  # the replay never reached the model


async def test_short_timeout_gets_a_flushed_prefix_before_it_expires(serve_miner, validator) -> None:
    words = [f"s{i:03d} " for i in range(200)]
    with LoopbackUpstream(tokens=words, interval=0.02) as slow:  # 4 s for the whole answer
        miner = serve_miner("--openai.base_url", slow.base_url, "--fallback.off", "--neuron.streaming_batch_size", "4")
        answer = await query(validator, miner, timeout=2.0)
    assert answer.status == 200
    assert answer.text and answer.text == answer.synapse.completion
    assert "".join(words).startswith(answer.text) and len(answer.text) < len("".join(words))
    assert answer.ended - answer.started < 2.0  # arrived before the validator gave up
    assert all(len(chunk.split()) % 4 == 0 for chunk in answer.chunks[:-1])  # the rest is the flush


async def test_32_concurrent_validators_each_get_their_own_answer(serve_miner, chain, wallets) -> None:
    def answer_to(body: dict) -> list[str]:
        who = body["messages"][-1]["content"]
        return [f"{who}-{i} " for i in range(20)]

    validators = [registered(chain, wallets(f"validator-{i}")) for i in range(32)]
    with LoopbackUpstream(tokens=answer_to, interval=0.04) as up:  # 0.8 s per answer
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "3")
        answers = await asyncio.gather(*(query(w, miner, f"v{i}") for i, w in enumerate(validators)))
    for i, answer in enumerate(answers):
        assert answer.status == 200, (i, answer.synapse.dendrite.status_message)
        assert answer.text == "".join(answer_to({"messages": [{"content": f"v{i}"}]})) == answer.synapse.completion
    assert len(up.requests) == 32
    # concurrent, by overlap rather than the clock: one after another, one would be in flight at a time
    in_flight = max(sum(r.received_at <= s.received_at < r.ended_at for r in up.requests) for s in up.requests)
    assert in_flight >= 8, in_flight


async def test_malformed_synapse_gets_400_while_other_streams_continue(serve_miner, chain, wallets) -> None:
    words = [f"m{i:02d} " for i in range(40)]
    validators = [registered(chain, wallets(f"validator-{i}")) for i in range(5)]
    with LoopbackUpstream(tokens=words, interval=0.02) as up:  # 0.8 s per answer
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.streaming_batch_size", "2")
        good = [asyncio.create_task(query(w, miner, f"q{i}")) for i, w in enumerate(validators[:4])]
        while sum(len(r.token_times) for r in up.requests) < 4 * 3:  # all four are streaming
            await asyncio.sleep(0.01)
        async with bt.Dendrite(wallet=validators[4]) as dendrite:
            bad = await ask(dendrite, miner.axon, ["user", "assistant"], ["only one"])
        bad_done = time.monotonic()
        answers = await asyncio.gather(*good)
    assert bad.status == 400
    assert "invalid prompt" in bad.synapse.dendrite.status_message
    assert "2 roles for 1 messages" in bad.synapse.dendrite.status_message
    assert bad.chunks == [] and len(up.requests) == 4
    for answer in answers:
        assert answer.status == 200 and answer.text == "".join(words)
        assert answer.ended > bad_done  # they were still streaming when the bad one was refused


# -- the real console command ----------------------------------------------------------------------


@pytest.mark.slow
async def test_console_command_serves_a_dendrite_and_stops_cleanly_on_sigint(tmp_path, wallets, upstream) -> None:
    port = free_port()
    wallet_path = tmp_path / "cli-wallets"
    argv = [
        "--mock", "--openai.base_url", upstream.base_url, "--fallback.off",
        "--wallet.path", str(wallet_path), "--wallet.name", "miner", "--wallet.hotkey", "default",
        "--axon.port", str(port), "--neuron.streaming_batch_size", "6",
        "--blacklist.allow_non_registered", "true", "--blacklist.force_validator_permit", "false",
    ]
    miner = MinerProcess(argv, env=cli_env(tmp_path), cwd=tmp_path, start_timeout=30)
    with miner:
        line = miner.summary
        assert f":{port}" in line and "network mock" in line and "batch 6 tokens" in line
        miner_wallet = bt.Wallet(name="miner", hotkey="default", path=str(wallet_path))
        axon = bt.AxonInfo(
            version=1, ip="127.0.0.1", port=port, ip_type=4,
            hotkey=miner_wallet.hotkey.ss58_address, coldkey=miner_wallet.coldkeypub.ss58_address,
        )
        async with bt.Dendrite(wallet=wallets("outsider")) as dendrite:
            responses = await dendrite.forward(
                axons=[axon], synapse=StreamPromptingSynapse(roles=["user"], messages=["hi"]),
                timeout=10, deserialize=False, streaming=True,
            )
            items = [item async for item in responses[0]]
        final = items[-1]
        assert isinstance(final, StreamPromptingSynapse) and final.dendrite.status_code == 200
        assert "".join(items[:-1]) == TEXT == final.completion
        assert miner.stop(grace=10) == 0, miner.log
        assert port_is_free(port)


# -- start-up that tells the truth (exit codes of cli.py) ------------------------------------------


@pytest.mark.slow
def test_busy_axon_port_exits_4_from_the_console_command(tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [
                MINER_CLI, "--mock", "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off",
                "--wallet.path", str(tmp_path / "w"), "--axon.port", str(port),
            ],
            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 4, done.stderr
    assert f"axon port {port} is busy" in done.stderr and "--axon.port" in done.stderr
    assert "Traceback" not in done.stderr and "openai-miner |" not in done.stdout


def test_unregistered_hotkey_raises_not_registered(tmp_path, chain) -> None:
    argv = miner_argv(tmp_path / "wallets", free_port(), "--mock", "false", "--axon.external_ip", "127.0.0.1")
    miner = OpenAIMiner(
        OpenAIMiner.config(argv, env={}), source=FakeSource(["x"]), subtensor=chain,
        wallet=make_wallet(tmp_path / "wallets", "miner"),
    )
    with pytest.raises(NotRegistered) as refused:
        miner.start_axon()
    assert refused.value.exit_code == 3
    assert "btcli subnet register" in str(refused.value) and "--mock" in str(refused.value)


def test_unregistered_hotkey_exits_3_from_main(tmp_path, chain, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bt, "Subtensor", subtensor_class(lambda config: chain))  # a chain where the miner is absent
    make_wallet(tmp_path / "wallets", "miner")
    argv = miner_argv(tmp_path / "wallets", free_port(), "--mock", "false", "--axon.external_ip", "127.0.0.1",
                      "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off")
    assert cli.main(argv) == 3
    error = capsys.readouterr().err
    assert "is not registered on netuid 1" in error and "btcli subnet register" in error


def test_missing_wallet_exits_5_before_touching_the_chain(tmp_path, monkeypatch, capsys) -> None:
    def no_chain(*args, **kwargs):
        raise AssertionError("the chain was contacted before the wallet was checked")

    monkeypatch.setattr(bt, "Subtensor", subtensor_class(no_chain))
    argv = ["--wallet.path", str(tmp_path / "nowhere"), "--wallet.name", "ghost", "--wallet.hotkey", "hk",
            "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off"]
    assert cli.main(argv) == 5
    error = capsys.readouterr().err
    assert "wallet ghost/hk not found" in error
    assert "coldkeypub.txt" in error and "btcli wallet create" in error and "--mock" in error
    assert "pip install bittensor-cli" in error  # where btcli comes from: the install does not bring it


def test_missing_hotkey_of_an_existing_coldkey_suggests_new_hotkey(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bt, "Subtensor", subtensor_class(lambda config: pytest.fail("chain contacted")))
    make_wallet(tmp_path / "wallets", "cold")
    argv = ["--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "cold", "--wallet.hotkey", "other"]
    assert cli.main(argv) == 5
    assert "btcli wallet new_hotkey --wallet.name cold --wallet.hotkey other" in capsys.readouterr().err


def test_unreachable_chain_exits_6(tmp_path, monkeypatch, capsys) -> None:
    def offline(config):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(bt, "Subtensor", subtensor_class(offline))
    make_wallet(tmp_path / "wallets", "miner")
    argv = ["--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "miner",
            "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off"]
    assert cli.main(argv) == 6
    error = capsys.readouterr().err
    assert "cannot reach the chain" in error and "--mock" in error


def test_unreadable_env_file_exits_2(tmp_path, capsys) -> None:
    (tmp_path / ".env").write_bytes(b"OPENAI_API_KEY=\xff\xfe\n")  # the cwd of every test
    assert cli.main(miner_argv(tmp_path / "wallets", free_port())) == 2
    error = capsys.readouterr().err
    assert "configuration error" in error and ".env" in error and "utf-8" in error


def test_unparsable_flag_exits_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(miner_argv(tmp_path / "wallets", free_port(), "--axon.port", "eighty"))
    assert stopped.value.code == 2
    assert "--axon.port: invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--neuron.streaming_batch_size", "0"], "--neuron.streaming_batch_size: must be at least 1, got 0"),
        (["--openai.timeout", "-1"], "--openai.timeout: must be greater than 0, got -1"),
        (["--fallback.max_batch", "0"], "--fallback.concurrency: must be at least 1, got 0"),
    ],
)
def test_flag_values_the_miner_cannot_use_exit_2(tmp_path, capsys, argv, expected) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(miner_argv(tmp_path / "wallets", free_port(), *argv))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--axon.port", "80"], {}, "--axon.port (or AXON_PORT) is 80"),
        ([], {"FALLBACK_MAX_BATCH": "0"}, "FALLBACK_MAX_BATCH='0': must be at least 1"),
        ([], {"NEURON_STREAMING_BATCH_SIZE": "-3"}, "NEURON_STREAMING_BATCH_SIZE='-3': must be at least 1"),
        (["--neuron.prompts_dir", "/no/such/prompts"], {}, "'/no/such/prompts' is not a directory"),
        ([], {"NEURON_PROMPTS_DIR": "/no/such/prompts"}, "NEURON_PROMPTS_DIR) '/no/such/prompts' is not a directory"),
    ],
)
def test_settings_the_miner_cannot_use_exit_2(tmp_path, monkeypatch, capsys, argv, env, expected) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(miner_argv(tmp_path / "wallets", free_port(), *argv)) == 2
    error = capsys.readouterr().err
    assert "configuration error" in error and expected in error and "Traceback" not in error


def test_miner_stopping_itself_exits_1(tmp_path, monkeypatch) -> None:
    from openai_miner import logs

    said: list[str] = []  # the lines written on the log's stream (bittensor's handler, bound at import)
    monkeypatch.setattr(logs, "say", said.append)
    monkeypatch.setattr(OpenAIMiner, "keep_synced", lambda self: None)  # as after request_exit()
    argv = miner_argv(tmp_path / "wallets", free_port(), "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off")
    assert cli.main(argv) == 1
    assert said[0].startswith("openai-miner |") and "stop_on_forward_exception" in said[-1]
    assert port_is_free(int(argv[argv.index("--axon.port") + 1]))


def test_help_mentions_the_demo(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--help"])
    assert stopped.value.code == 0
    assert "openai-miner demo" in capsys.readouterr().out
