"""Why a miner cannot start, and the checks that say so before it serves anything.

Each :class:`StartupError` carries a documented exit code and a message with the fix. The checks
are cheap (files, sockets, one chain call), so they run before any slow work.
"""

import contextlib
import os
import socket
import time
from typing import Iterator

import bittensor as bt
from bittensor_wallet import Keypair

DEFAULT_WALLETS = "~/.bittensor/wallets"  # bittensor's default --wallet.path
MOCK_WALLETS = "~/.bittensor/mock-wallets"  # where --mock makes the keys it needs, away from real ones


class StartupError(RuntimeError):
    """The miner cannot start; the message says why and how to fix it, ``exit_code`` is documented."""

    exit_code = 1


class NotRegistered(StartupError):
    """The wallet's hotkey is not on the subnet: a miner cannot earn, so it does not start."""

    exit_code = 3


class PortBusy(StartupError):
    """Another process holds the axon port (bittensor would fail silently in its thread)."""

    exit_code = 4


class WalletMissing(StartupError):
    """The wallet's keys are not on this machine: nothing can be signed, so the miner does not start."""

    exit_code = 5


class ChainUnreachable(StartupError):
    """The subtensor endpoint cannot be reached (offline, wrong ``--subtensor.network``)."""

    exit_code = 6


def keys_missing(wallet: bt.Wallet) -> list[str]:
    return [
        keyfile.path
        for keyfile in (wallet.coldkeypub_file, wallet.hotkey_file)
        if not keyfile.exists_on_device()
    ]


def make_keys(wallet: bt.Wallet) -> bt.Wallet:
    """Give ``wallet`` the keys a miner or validator signs with, where missing: a hotkey, and a
    coldkey's public half only (no coldkey: no secret phrase, nothing to spend)."""
    if not wallet.coldkeypub_file.exists_on_device():
        wallet.set_coldkeypub(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), encrypt=False, overwrite=False)
    if not wallet.hotkey_file.exists_on_device():
        wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    return wallet


def mock_wallet(wallet: bt.Wallet) -> bt.Wallet:
    """The wallet a ``--mock`` run signs with, made if its keys are missing, announced, and harmless.

    A made wallet holds a hotkey and a coldkey's public half only: no coldkey (no secret phrase,
    no funds) is ever written. In bittensor's default wallet directory nothing is made at all:
    the throwaway keys go to :data:`MOCK_WALLETS`, so a later run without ``--mock`` cannot pick
    them up for a real chain.
    """
    if not keys_missing(wallet):
        return wallet
    if os.path.normpath(os.path.expanduser(wallet.path)) == os.path.normpath(os.path.expanduser(DEFAULT_WALLETS)):
        wallet = bt.Wallet(name=wallet.name, hotkey=wallet.hotkey_str, path=MOCK_WALLETS)
    make_keys(wallet)
    bt.logging.warning(
        f"--mock: made a throwaway hotkey for wallet {wallet.name}/{wallet.hotkey_str} under "
        f"{os.path.expanduser(wallet.path)} (no coldkey written; it is for the mock chain only)"
    )
    return wallet


def require_wallet(wallet: bt.Wallet) -> None:
    """Fail before any chain access when the coldkeypub or hotkey file is not there."""
    missing = keys_missing(wallet)
    if not missing:
        return
    names = f"--wallet.name {wallet.name} --wallet.hotkey {wallet.hotkey_str}"
    create = (
        f"`btcli wallet create {names}`"
        if not wallet.coldkeypub_file.exists_on_device()
        else f"`btcli wallet new_hotkey {names}`"
    )
    raise WalletMissing(
        f"wallet {wallet.name}/{wallet.hotkey_str} not found under {os.path.expanduser(wallet.path)} "
        f"(missing {', '.join(missing)}): create it with {create} (btcli comes with "
        "`pip install bittensor-cli`), point --wallet.name, --wallet.hotkey or --wallet.path at an "
        "existing one, or try it offline with --mock"
    )


@contextlib.contextmanager
def chain_errors(config: bt.Config) -> Iterator[None]:
    """A chain that cannot be reached (when connecting or serving the axon) is a clear error."""
    try:
        yield
    except ConnectionError as error:
        network = config.subtensor.network
        endpoint = config.subtensor.get("chain_endpoint") or network
        raise ChainUnreachable(
            f"cannot reach the chain ({network} at {endpoint}): {error}; check the network, "
            "--subtensor.network / --subtensor.chain_endpoint, or try it offline with --mock"
        ) from error


def ensure_port_free(port: int, what: str = "axon", flag: str = "--axon.port") -> None:
    """Fail loudly: a busy port otherwise dies silently inside uvicorn's thread."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise PortBusy(
                f"{what} port {port} is busy ({exc.strerror}); stop whatever uses it or pass {flag}"
            ) from exc


def wait_port(port: int, *, listening: bool, timeout: float) -> bool:
    """Wait until something accepts connections on ``port`` (or, ``listening=False``, nothing does)."""
    end = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if (probe.connect_ex(("127.0.0.1", port)) == 0) is listening:
                return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
