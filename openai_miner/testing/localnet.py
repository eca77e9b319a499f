"""A subnet on this machine: free ports, throwaway wallets, the mock chain and the miner's flags.

bittensor asks the internet for this machine's public IP when a dendrite or axon starts;
:func:`offline_ip` answers that locally. The mock chain's state is process-global
(``bt.MockSubtensor``): :func:`mock_chain` starts it afresh, :func:`register_validator` puts a
hotkey on it with a permit and stake.
"""

import contextlib
import os
import random
import socket
from pathlib import Path
from typing import Iterator

import bittensor as bt
import bittensor.utils.networking as networking
from bittensor.core.chain_data import AxonInfo

from openai_miner.chain import mock_subtensor, register_mock_neuron
from openai_miner.startup import make_keys

NETUID = 1
VALIDATOR_STAKE = 1000.0
OPEN_TO_ALL = ("--blacklist.allow_non_registered", "true", "--blacklist.force_validator_permit", "false")
"""Flags that let hotkeys off the miner's mock chain ask it (blacklist and priority still run)."""


PORTS_FROM, PORTS_EACH = 20_000, 1_000
"""Where :func:`free_port` looks: below Linux's ephemeral range (32768 up), 1,000 ports per test
process, so that neither an outgoing connection nor another pytest-xdist worker takes the port
between this check and the miner's bind (both happened with ports the kernel picked)."""


def _ports() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = PORTS_FROM + (int(worker) if worker.isdigit() else 0) % 12 * PORTS_EACH
    start = random.randrange(PORTS_EACH)  # two runs at once on one machine rarely meet
    while True:
        for offset in range(PORTS_EACH):
            yield first + (start + offset) % PORTS_EACH


_candidates = _ports()


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port free on every address, as the miner's own check (and its axon, on 0.0.0.0) needs it;
    never the same twice within 1,000 calls."""
    return next(port for port in _candidates if _bindable(port))


@contextlib.contextmanager
def offline_ip(ip: str = "127.0.0.1") -> Iterator[None]:
    """Answer bittensor's public-IP lookup with ``ip`` instead of asking the internet."""
    original = networking.get_external_ip
    networking.get_external_ip = lambda: ip
    try:
        yield
    finally:
        networking.get_external_ip = original


def make_wallet(path: str | Path, name: str) -> bt.Wallet:
    """A throwaway wallet under ``path``: its hotkey and coldkeypub, made if missing, no coldkey."""
    return make_keys(bt.Wallet(name=name, hotkey="default", path=str(path)))


def mock_chain(netuid: int = NETUID) -> bt.MockSubtensor:
    """A fresh mock chain with subnet ``netuid``: its state is process-global, so this clears
    what an earlier miner or test left on it."""
    bt.MockSubtensor.reset()
    return mock_subtensor(netuid)


def register_validator(
    chain: bt.MockSubtensor, wallet: bt.Wallet, *, stake: float = VALIDATOR_STAKE, netuid: int = NETUID
) -> int:
    """Register ``wallet``'s hotkey on the mock chain with a validator permit and ``stake``."""
    return register_mock_neuron(
        chain, netuid, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address,
        stake=stake, validator_permit=True,
    )


def miner_argv(wallet_dir: str | Path, port: int, *extra: str, name: str = "miner", netuid: int = NETUID) -> list[str]:
    """The miner's command line on the mock chain, its axon on 127.0.0.1:``port``, then ``extra``."""
    return [
        "--mock", "--netuid", str(netuid),
        "--wallet.path", str(wallet_dir), "--wallet.name", name, "--wallet.hotkey", "default",
        "--axon.port", str(port), "--axon.external_ip", "127.0.0.1",
        *extra,
    ]


def axon_info(port: int, hotkey: str, coldkey: str) -> AxonInfo:
    """What a validator dials: a miner's axon on 127.0.0.1:``port``."""
    return AxonInfo(
        version=0, ip="127.0.0.1", ip_type=4, port=port, hotkey=hotkey,
        coldkey=coldkey, protocol=4, placeholder1=0, placeholder2=0,
    )
