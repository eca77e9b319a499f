"""Shared fixtures: throwaway wallets, a fresh mock chain, free ports, and a miner factory.

Nothing here reaches the network: the chain is ``bt.MockSubtensor``, the axon listens on
127.0.0.1, and the dendrite's public-IP lookup is answered locally.
"""

import os
import socket
from pathlib import Path
from typing import Callable, Iterator

import bittensor as bt
import pytest

from openai_miner.chain import mock_subtensor, register_mock_neuron
from openai_miner.miner import OpenAIMiner
from openai_miner.sources.base import TokenSource

NETUID = 1
os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: local models load from disk only


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_wallet(root: Path, name: str) -> bt.Wallet:
    wallet = bt.Wallet(name=name, hotkey="default", path=str(root))
    wallet.create_if_non_existent(coldkey_use_password=False, hotkey_use_password=False, suppress=True)
    return wallet


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No public-IP lookup, no developer key or ``.env`` leaking into a test."""
    monkeypatch.setattr("bittensor.utils.networking.get_external_ip", lambda: "127.0.0.1")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def chain() -> bt.MockSubtensor:
    bt.MockSubtensor.reset()
    return mock_subtensor(NETUID)


@pytest.fixture
def wallets(tmp_path: Path) -> Callable[[str], bt.Wallet]:
    return lambda name: make_wallet(tmp_path / "wallets", name)


@pytest.fixture
def validator(chain: bt.MockSubtensor, wallets: Callable[[str], bt.Wallet]) -> bt.Wallet:
    """A registered validator hotkey with a permit and some stake."""
    wallet = wallets("validator")
    register_mock_neuron(
        chain, NETUID, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address,
        stake=1000.0, validator_permit=True,
    )
    return wallet


def miner_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--mock", "--netuid", str(NETUID),
        "--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "miner", "--wallet.hotkey", "default",
        "--axon.port", str(free_port()),
        *extra,
    ]


@pytest.fixture
def serve_miner(
    tmp_path: Path, chain: bt.MockSubtensor
) -> Iterator[Callable[..., OpenAIMiner]]:
    """Start an ``OpenAIMiner`` on the mock chain with ``source``; stopped after the test."""
    started: list[OpenAIMiner] = []

    def start(*extra: str, source: TokenSource | None = None, env: dict | None = None) -> OpenAIMiner:
        config = OpenAIMiner.config(miner_argv(tmp_path, *extra), env=env or {})
        miner = OpenAIMiner(config, source=source, subtensor=chain)
        miner.run_in_background_thread()
        started.append(miner)
        return miner

    yield start
    for miner in started:
        miner.stop_run_thread()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny local model directory (needs the ``local`` extra)."""
    pytest.importorskip("transformers")
    from tests.tiny_model import TEMPLATE, build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TEMPLATE))
