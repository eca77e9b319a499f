"""Fronts as files: several in one process, the port the chain publishes, configurations that
serve nothing or clash, the summary line, and a third party's front added through the
``openai_miner.fronts`` entry-point group. Everything over 127.0.0.1; the chain is the mock one."""

import argparse
import asyncio
import json
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, Sequence

import bittensor as bt
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_miner import cli
from openai_miner.access import (
    Access,
    AccessPolicy,
    RateLimiter,
    RecentPrompts,
    Refusals,
)
from openai_miner.chain import Registry, register_mock_neuron
from openai_miner.config import ConfigError
from openai_miner.core import Core, Question, Refused
from openai_miner.fronts import base
from openai_miner.fronts.base import Front
from openai_miner.miner import OpenAIMiner
from openai_miner.sources.base import Token
from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.streaming import text_of
from openai_miner.system_prompts import SystemPrompts
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.localnet import NETUID, free_port, make_wallet, miner_argv
from openai_miner.testing.loosh import LooshValidator
from openai_miner.testing.validator import ask, ask_http, signing_client

WORDS = [f"w{i:02d} " for i in range(12)]
TEXT = "".join(WORDS)


class EchoFront(Front):
    """A third party's front: ``POST /ask {"prompt"}`` answered whole through the miner's core."""

    name = "echo"
    label = "echo front"
    port_flag = "--echo.port"
    switch = "--echo.port PORT"

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--echo.port", type=int, default=None, help="Serve the echo front on this port.")

    @classmethod
    def enabled(cls, config: bt.Config) -> bool:
        return config.echo.port is not None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.miner.config.echo.port

    def server(self) -> uvicorn.Server:
        core = self.core

        async def answer(request: Request) -> Response:
            prompt = (await request.json())["prompt"]
            parts: list[str] = []

            async def collect(batch: Sequence[str | Token]) -> None:
                parts.append(text_of(batch))

            question = Question(core.chat(["user"], [prompt], None, templated=False), core.deadline(10.0))
            await core.answer(question, collect)
            return JSONResponse({"text": "".join(parts)})

        app = Starlette(routes=[Route("/ask", answer, methods=["POST"])])
        return uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))


class NotAFront:
    pass


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``registered(*values)``: the installed ``openai_miner.fronts`` entry points are these."""

    def install(*values: str) -> None:
        points = [EntryPoint(value.rsplit(":", 1)[1].lower(), value, base.GROUP) for value in values]
        monkeypatch.setattr(base, "entry_points", lambda group: points if group == base.GROUP else [])

    return install


def http_port(miner: OpenAIMiner) -> int:
    return miner.config.http.port


async def ask_every_front(miner: OpenAIMiner, validator: bt.Wallet) -> dict[str, str]:
    """The same question through each front the miner serves, at once: each front's answer text."""
    hotkey = miner.wallet.hotkey.ss58_address
    names = [front.name for front in miner.fronts]

    async def by_axon() -> str:
        async with bt.Dendrite(wallet=validator) as dendrite:
            answer = await ask(dendrite, miner.axon, ["user"], ["hello"], 10.0)
        assert answer.ok, answer
        return answer.text

    async def by_http() -> str:
        async with signing_client(validator.hotkey, hotkey) as client:
            answer = await ask_http(client, http_port(miner), "hello")
        assert answer.ok, answer
        return answer.text

    async def by_loosh() -> str:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{miner.config.loosh.port}") as client:
            sn78 = LooshValidator(validator.hotkey, client)
            assert await sn78.available()
            reply = await sn78.ask({"prompt": "hello", "correlation_id": "c-1"})
        assert reply.ok and reply.answer["correlation_id"] == "c-1", reply
        return reply.answer["response_text"]

    asking = {"axon": by_axon, "http": by_http, "loosh": by_loosh}
    texts = await asyncio.gather(*(asking[name]() for name in names))
    return dict(zip(names, texts))


async def test_three_fronts_in_one_process(serve_miner, validator) -> None:
    source = FakeSource(WORDS)
    miner = serve_miner("--http.port", str(free_port()), "--loosh.port", str(free_port()), source=source)
    assert await ask_every_front(miner, validator) == {"axon": TEXT, "http": TEXT, "loosh": TEXT}
    assert source.finished == 3 and miner.core.stats.by_outcome()["complete"] == 3


async def test_two_fronts_without_the_axon(serve_miner, validator) -> None:
    miner = serve_miner(
        "--axon.off", "--http.port", str(free_port()), "--loosh.port", str(free_port()), source=FakeSource(WORDS)
    )
    assert await ask_every_front(miner, validator) == {"http": TEXT, "loosh": TEXT}
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", miner.axon.port)


async def test_the_sn78_front_alone(serve_miner, validator) -> None:
    miner = serve_miner("--axon.off", "--loosh.port", str(free_port()), "--loosh.timeout", "30", source=FakeSource(WORDS))
    assert await ask_every_front(miner, validator) == {"loosh": TEXT}
    assert [front.name for front in miner.fronts] == ["loosh"] and miner.advertised.name == "loosh"


async def test_a_third_party_front_from_its_entry_point(serve_miner, registered) -> None:
    registered("tests.test_fronts:EchoFront")
    port = free_port()
    miner = serve_miner("--axon.off", "--echo.port", str(port), source=FakeSource(WORDS))
    async with httpx.AsyncClient() as client:
        response = await client.post(f"http://127.0.0.1:{port}/ask", json={"prompt": "hello"})
    assert response.json() == {"text": TEXT}
    assert miner.advertised.name == "echo"
    assert cli.summary(miner).startswith(f"openai-miner | network mock | netuid {NETUID} | hotkey ")
    assert f"| echo 127.0.0.1:{port} (advertised: 127.0.0.1:{port}) |" in cli.summary(miner)


def test_an_entry_point_that_is_no_front_is_a_config_error(registered) -> None:
    registered("tests.test_fronts:NotAFront")
    with pytest.raises(ConfigError, match="is not a Front class"):
        OpenAIMiner.config([], env={})


def test_an_entry_point_that_cannot_load_is_a_config_error(registered) -> None:
    registered("tests.no_such_module:Front")
    with pytest.raises(ConfigError, match="cannot load the front front = tests.no_such_module:Front"):
        OpenAIMiner.config([], env={})


def test_two_fronts_of_one_name_are_a_config_error(registered, monkeypatch) -> None:
    monkeypatch.setattr(EchoFront, "name", "http")
    registered("tests.test_fronts:EchoFront")
    with pytest.raises(ConfigError, match="two fronts are named 'http'"):
        OpenAIMiner.config([], env={})


# -- what the chain publishes ----------------------------------------------------------------------


@pytest.fixture
def publish(tmp_path: Path, chain: bt.MockSubtensor) -> Any:
    """``publish(*flags) -> (miner, (ip, port))``: a miner off the mock flag (as on a real chain,
    the mock chain passed in), started; what its ``serve()`` put on chain."""
    wallets = tmp_path / "wallets"
    served: list[tuple[str, int]] = []
    chain.serve_axon = lambda netuid, axon, **_: served.append((axon.external_ip, axon.external_port))  # type: ignore[method-assign]
    started: list[OpenAIMiner] = []

    def start(*flags: str) -> tuple[OpenAIMiner, tuple[str, int]]:
        wallet = make_wallet(wallets, "miner")
        register_mock_neuron(chain, NETUID, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
        argv = [arg for arg in miner_argv(wallets, free_port(), *flags) if arg != "--mock"]
        miner = OpenAIMiner(OpenAIMiner.config(argv, env={}), source=FakeSource(WORDS), subtensor=chain)
        started.append(miner)
        miner.start_axon()
        return miner, served[-1]

    yield start
    for miner in started:
        miner.stop_run_thread()


@pytest.mark.parametrize(
    "flags, advertised",
    [
        ((), "axon"),
        (("--advertise", "http"), "http"),
        (("--http.advertise",), "http"),
        (("--advertise", "loosh"), "loosh"),
        (("--advertise", "axon", "--http.advertise"), "axon"),  # the general flag wins
    ],
)
def test_the_chain_publishes_the_advertised_front(publish, flags, advertised) -> None:
    ports = {"http": free_port(), "loosh": free_port()}
    miner, published = publish("--http.port", str(ports["http"]), "--loosh.port", str(ports["loosh"]), *flags)
    ports["axon"] = miner.axon.port
    assert published == ("127.0.0.1", ports[advertised]) and miner.advertised.name == advertised
    assert f"{advertised} 0.0.0.0:{ports[advertised]} (advertised: 127.0.0.1:{ports[advertised]})" in miner.summary()


@pytest.mark.parametrize("flags, advertised", [(("--http.port",), "http"), (("--loosh.port",), "loosh")])
def test_without_the_axon_the_first_front_served_is_published(publish, flags, advertised) -> None:
    port = free_port()
    miner, published = publish("--axon.off", *flags, str(port))
    assert published == ("127.0.0.1", port) and miner.advertised.name == advertised


def test_the_summary_lists_every_front_served_and_marks_the_advertised(serve_miner) -> None:
    http, loosh = free_port(), free_port()
    miner = serve_miner("--http.port", str(http), "--loosh.port", str(loosh), "--advertise", "http", source=FakeSource(WORDS))
    line = cli.summary(miner)
    assert (
        f"| axon 0.0.0.0:{miner.axon.port}, http 0.0.0.0:{http} (advertised: 127.0.0.1:{http}), "
        f"loosh 0.0.0.0:{loosh} | backend fake |"
    ) in line
    alone = serve_miner("--axon.off", "--http.port", str(free_port()), source=FakeSource(WORDS))
    assert "axon" not in cli.summary(alone)  # a front not served is not in the line


def test_the_summary_says_when_the_open_file_limit_bounds_the_connections(serve_miner, monkeypatch) -> None:
    from openai_miner import base

    monkeypatch.setattr(base, "raise_file_limit", lambda: 456)  # a hard limit that stays low
    miner = serve_miner("--axon.off", "--http.port", str(free_port()), source=FakeSource(WORDS))
    assert miner.places == 100
    assert "| 100 connections per front (open-file limit low: raise `ulimit -n`) |" in cli.summary(miner)
    roomy = serve_miner("--axon.off", "--http.port", str(free_port()), "--neuron.max_connections", "100", source=FakeSource(WORDS))
    assert "open-file limit" not in cli.summary(roomy)  # the limit allows what was asked


# -- configurations that cannot serve ----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--axon.off",), "nothing to serve: every front is off (turn one on: no --axon.off, --http.port PORT, --loosh.port PORT)"),
        (("--http.port", "{port}", "--loosh.port", "{port}"), "--loosh.port {port} is the HTTP front's port: pick another"),
        (("--http.port", "{axon}"), "--http.port {axon} is the axon's port: pick another"),
        (("--advertise", "loosh"), "--advertise loosh: that front is not served (served: axon)"),
        (("--axon.off", "--http.port", "{port}", "--advertise", "axon"), "--advertise axon: that front is not served (served: http)"),
        (("--http.advertise",), "--advertise http: that front is not served (served: axon)"),
    ],
)
def test_a_configuration_that_cannot_serve_exits_2(tmp_path, capsys, flags, message) -> None:
    axon, port = free_port(), free_port()
    filled = [flag.format(port=port, axon=axon) for flag in flags]
    argv = miner_argv(tmp_path / "w", axon, "--fallback.off", "--openai.base_url", "http://127.0.0.1:9/v1", *filled)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"openai-miner: configuration error: {message.format(port=port, axon=axon)}"


def test_advertise_names_a_front(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        OpenAIMiner.config(["--advertise", "dendrite"], env={})
    assert exit_.value.code == 2 and "invalid choice: 'dendrite'" in capsys.readouterr().err


def test_advertise_from_the_environment() -> None:
    assert OpenAIMiner.config([], env={"ADVERTISE": "loosh"}).advertise == "loosh"


# -- the SN78 front's availability -----------------------------------------------------------------


class LoadingModel(FakeSource):
    name = "local"
    loaded = False


@pytest.mark.parametrize("primary, loaded, available", [(None, False, False), (None, True, True), (FakeSource(WORDS), False, True)])
async def test_sn78_availability_follows_what_can_answer(build_miner, primary, loaded, available) -> None:
    local = LoadingModel(WORDS)
    local.loaded = loaded
    source = FallbackSource(primary, local, CircuitBreaker(3, 30.0))
    miner = build_miner("--axon.off", "--loosh.port", str(free_port()), source=source)
    (front,) = miner.fronts
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app()), base_url="http://miner") as client:
        response = await client.get("/availability")
    assert response.status_code == 200 and json.loads(response.content) == {"available": available}


# -- the admission steps every front shares --------------------------------------------------------


def test_a_proven_callers_request_becomes_a_question_in_one_core_call() -> None:
    access = Access(AccessPolicy(allow_non_registered=True), Registry(), RateLimiter(2), RecentPrompts(0), refusals=Refusals(every=0))
    core = Core(FakeSource(WORDS), access, SystemPrompts({"generic": "Be brief."}), deadline_margin=0.5)
    asked = core.question("v", ["user"], ["hi"], None, timeout=10.0, arrived=100.0, batch_size=1)
    assert [m.content for m in asked.messages] == ["Be brief.", "hi"] and asked.deadline == 109.5
    assert (asked.hotkey, asked.batch_size) == ("v", 1)
    with pytest.raises(Refused) as invalid:  # counted against the limit: it was asked
        core.question("v", ["wizard"], ["hi"], None, timeout=None, arrived=0.0, invalid="challenge")
    assert invalid.value.status == 400 and invalid.value.reason.startswith("challenge: ")
    with pytest.raises(Refused) as limited:
        core.question("v", ["user"], ["hi"], None, timeout=None, arrived=0.0)
    assert limited.value.status == 429 and "requests in a minute" in limited.value.reason
