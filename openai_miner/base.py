"""The base ``Miner``: wallet, chain, registry, the axon and its gate, and the run loop.

Subclasses supply the answer (:meth:`Miner.forward`, :meth:`Miner.prompt`). Everything here is
the part every subnet-1 miner needs and few get right: refusing unregistered callers before any
work, serving the axon, keeping the registry fresh, and stopping cleanly.

No ``from __future__ import annotations`` here: bittensor's ``Axon.attach`` compares the real
annotation objects of ``forward``/``blacklist``/``priority``.
"""

import abc
import argparse
import threading
import typing
from typing import Mapping, Sequence

import bittensor as bt

from openai_miner import access, core, system_prompts
from openai_miner.access import Access
from openai_miner.chain import Registry, fetch_registry, mock_subtensor, register_mock_neuron
from openai_miner.config import add_bool, at_least, build_config
from openai_miner.fronts.axon import Axon, AxonGate, StreamingResponse
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.startup import (
    NotRegistered,
    StartupError,
    chain_errors,
    ensure_port_free,
    keys_missing,
    require_wallet,
    wait_port,
)


class Miner(abc.ABC):
    """A subnet-1 miner: subclass and implement :meth:`forward` and :meth:`prompt`."""

    def __init__(
        self,
        config: bt.Config | None = None,
        *,
        wallet: bt.Wallet | None = None,
        subtensor: bt.Subtensor | None = None,
        axon: bt.Axon | None = None,
    ) -> None:
        self.config = config if config is not None else type(self).config()
        if self.config.get("logging"):
            bt.logging.set_config(self.config.logging)
        netuid = self.config.netuid
        self.wallet = wallet or bt.Wallet(config=self.config)
        if self.config.mock and keys_missing(self.wallet):
            self.wallet.create_if_non_existent(
                coldkey_use_password=False, hotkey_use_password=False, suppress=True
            )
        require_wallet(self.wallet)
        if subtensor is None:
            with chain_errors(self.config):
                subtensor = mock_subtensor(netuid) if self.config.mock else bt.Subtensor(config=self.config)
        self.subtensor = subtensor
        if self.config.mock:
            register_mock_neuron(
                self.subtensor,
                netuid,
                self.wallet.hotkey.ss58_address,
                self.wallet.coldkeypub.ss58_address,
            )
        self.access = Access.from_config(self.config, fetch_registry(self.subtensor, netuid))
        self.gate = AxonGate(self.access)
        self.axon = axon or Axon(
            wallet=self.wallet,
            config=self.config,
            external_ip=self.config.axon.external_ip or ("127.0.0.1" if self.config.mock else None),
        )
        self._exit = threading.Event()
        self._thread: threading.Thread | None = None
        self.is_running = False

    @property
    def registry(self) -> Registry:
        """The subnet's neurons as of the last refresh."""
        return self.access.registry

    # -- configuration ------------------------------------------------------------------------

    @classmethod
    def config(
        cls,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        epilog: str | None = None,
    ) -> bt.Config:
        """Flags of this class (``add_args``) parsed over the environment and ``.env``."""
        parser = argparse.ArgumentParser(
            prog="openai-miner",
            description=cls.__doc__,
            epilog=epilog,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        cls.add_args(parser)
        return build_config(parser, argv, env)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        bt.Wallet.add_args(parser)
        bt.Subtensor.add_args(parser)
        bt.Axon.add_args(parser)
        bt.logging.add_args(parser)
        parser.add_argument("--netuid", type=at_least(0), default=1, help="Subnet to mine on (1 is prompting).")
        add_bool(parser, "--mock", default=False, help="Run on an in-process mock chain: no network, no registration.")
        parser.add_argument(
            "--neuron.sync_interval", type=at_least(0, float, inclusive=False), default=120.0,
            help="Seconds between refreshes of the registered hotkeys and stakes.",
        )
        core.add_args(parser)
        system_prompts.add_args(parser)
        access.add_args(parser)

    # -- what subclasses implement --------------------------------------------------------------

    @abc.abstractmethod
    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        """Answer ``synapse`` as a streaming response."""

    @abc.abstractmethod
    async def prompt(self, synapse: StreamPromptingSynapse) -> StreamPromptingSynapse:
        """Answer ``synapse`` whole: fill ``completion`` and return it."""

    # -- what the axon calls --------------------------------------------------------------------

    def _prompt(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        """The axon's entry point, after signature checks: rate limit, refuse a recent repeat, forward."""
        self.gate.admit(synapse)
        return self.forward(synapse)

    def blacklist(self, synapse: StreamPromptingSynapse) -> typing.Tuple[bool, str]:
        return self.gate.blacklist(synapse)

    def priority(self, synapse: StreamPromptingSynapse) -> float:
        return self.gate.priority(synapse)

    # -- lifecycle ------------------------------------------------------------------------------

    def sync(self) -> None:
        """Refresh the registry; a failed refresh keeps the last good one."""
        try:
            self.access.registry = fetch_registry(self.subtensor, self.config.netuid)
        except Exception as exc:
            bt.logging.warning(f"could not refresh the registry, keeping the last one: {exc}")

    def check_registered(self) -> None:
        hotkey = self.wallet.hotkey.ss58_address
        if self.registry.get(hotkey) is None:
            raise NotRegistered(
                f"hotkey {hotkey} (wallet {self.wallet.name}/{self.wallet.hotkey_str}) is not registered "
                f"on netuid {self.config.netuid} of {self.config.subtensor.network}: register it with "
                f"`btcli subnet register --netuid {self.config.netuid}`, or run with --mock to try it offline"
            )

    def start_axon(self) -> None:
        """Check, attach, serve and start the axon; returns once it is listening."""
        self.check_registered()
        ensure_port_free(self.axon.port)
        self.axon.attach(forward_fn=self._prompt, blacklist_fn=self.blacklist, priority_fn=self.priority)
        if not self.config.mock:
            with chain_errors(self.config):
                self.axon.serve(netuid=self.config.netuid, subtensor=self.subtensor)
        # Outlive the dendrite's idle keep-alive (aiohttp: 15 s); at uvicorn's 5 s a validator reusing
        # a connection as it closes gets ServerDisconnectedError (measured: 266 of 2,560 streams).
        self.axon.fast_config.timeout_keep_alive = 20
        self.axon.start()
        if not wait_port(self.axon.port, listening=True, timeout=10.0):
            raise StartupError(f"the axon did not start listening on port {self.axon.port} within 10s")
        self.is_running = True
        bt.logging.info(f"axon serving on {self.axon.external_ip}:{self.axon.external_port}")

    def run(self) -> None:
        """Serve until :meth:`stop_run_thread`, Ctrl-C or an exit request; refresh the registry."""
        self.start_axon()
        try:
            self.keep_synced()
        except KeyboardInterrupt:
            bt.logging.info("interrupted: stopping")
        finally:
            self.stop_run_thread()

    def run_in_background_thread(self) -> None:
        """Start :meth:`run` in a daemon thread; returns once the axon listens."""
        if self._thread is not None:
            return
        self._exit.clear()
        self.start_axon()
        self._thread = threading.Thread(target=self.keep_synced, name="miner", daemon=True)
        self._thread.start()

    def keep_synced(self) -> None:
        """Refresh the registry every ``--neuron.sync_interval`` seconds until asked to exit."""
        while not self._exit.wait(self.config.neuron.sync_interval):
            self.sync()

    def request_exit(self) -> None:
        """Ask :meth:`run` (or the background thread) to stop after the current wait."""
        self._exit.set()

    def stop_run_thread(self, grace: float = 1.0) -> None:
        """Stop serving and return once the axon's port is free.

        uvicorn waits for in-flight answers forever by default; a bounded grace period makes it
        cancel them, which also cancels their upstream requests and local generations.
        """
        self._exit.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.is_running:
            return
        self.axon.fast_server.config.timeout_graceful_shutdown = grace
        self.axon.stop()
        self.is_running = False
        if not wait_port(self.axon.port, listening=False, timeout=grace + 5):
            bt.logging.warning(f"the axon still listens on port {self.axon.port}")

    def __enter__(self) -> "Miner":
        self.run_in_background_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_run_thread()
