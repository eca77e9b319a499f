"""The base ``Miner``: wallet, chain, registry, its fronts, and the run loop.

Subclasses supply the answer (:meth:`Miner.forward`, :meth:`Miner.prompt`). Everything here is
the part every miner needs and few get right: refusing unregistered callers before any work,
serving every enabled front (:mod:`openai_miner.fronts.base`; this module names none of them),
publishing the advertised one on chain, keeping the registry fresh, and stopping cleanly.

No ``from __future__ import annotations`` here: bittensor's ``Axon.attach`` compares the real
annotation objects of ``forward``/``blacklist``/``priority``.
"""

import abc
import argparse
import threading
import typing
from typing import ClassVar, Mapping, Sequence

import bittensor as bt

from openai_miner import access, core, system_prompts
from openai_miner.access import Access
from openai_miner.chain import Registry, fetch_registry, mock_subtensor, register_mock_neuron
from openai_miner import __version__
from openai_miner.config import (
    ACCESS,
    ANSWERS,
    CHAIN,
    FRONTS,
    ConfigError,
    Help,
    HelpAll,
    Parser,
    add_bool,
    at_least,
    build_config,
    group,
    tidy_help,
)
from openai_miner.fronts.axon import AxonGate, StreamingResponse, chain_identity
from openai_miner.fronts.base import Front, discover, unique
from openai_miner.logs import setup as label_own_lines
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.serving import Servers, StopRequest, harden, places_per_front, raise_file_limit
from openai_miner.startup import (
    NotRegistered,
    StartupError,
    chain_errors,
    mock_wallet,
    require_wallet,
    wait_port,
)


class Miner(abc.ABC):
    """A subnet-1 miner: subclass and implement :meth:`forward` and :meth:`prompt`."""

    front_types: ClassVar[Sequence[type[Front]] | None] = None
    """The fronts this miner may serve; ``None``: the built-in ones, then those registered under the
    ``openai_miner.fronts`` entry-point group (:func:`~openai_miner.fronts.base.discover`)."""

    def __init__(
        self,
        config: bt.Config | None = None,
        *,
        wallet: bt.Wallet | None = None,
        subtensor: bt.Subtensor | None = None,
        axon: bt.Axon | None = None,
    ) -> None:
        self.config = config if config is not None else type(self).config()
        label_own_lines()  # first: setting the level logs bittensor's notes, which it drops
        if self.config.get("logging"):
            bt.logging.set_config(self.config.logging)
        netuid = self.config.netuid
        self.wallet = wallet or bt.Wallet(config=self.config)
        if self.config.mock:
            self.wallet = mock_wallet(self.wallet)
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
        self.gate = AxonGate(self.access)  # the seed API's blacklist and priority
        self.axon = axon or chain_identity(self.wallet, self.config, self.access)
        self.fronts: list[Front] = [kind(self) for kind in type(self).front_classes() if kind.enabled(self.config)]
        self.advertised = self.choose_advertised()
        self.exit_request = StopRequest()  # the real command also wakes it on signals
        self._thread: threading.Thread | None = None
        self.servers: Servers | None = None
        self.places = self.config.neuron.max_connections  # per front; lower where open files are few
        self.is_running = False
        self.check_ports()  # before anything slow (a subclass's model load): a busy port fails in seconds

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
        parser = Parser(
            prog="openai-miner",
            usage="openai-miner [demo [PROMPT]] [OPTIONS]",
            description=cls.__doc__,
            epilog=epilog,
            formatter_class=Help,
            add_help=False,
        )
        parser.add_argument("-h", "--help", action="help", help="Show the miner's options and exit.")
        parser.add_argument("--help-all", action=HelpAll, help="Show the tuning options and bittensor's internal ones too, and exit.")
        parser.add_argument(
            "--version", action="version", version=f"openai-miner {__version__}", help="Show the version and exit."
        )
        cls.add_args(parser)
        tidy_help(parser)
        return build_config(parser, argv, env)

    @classmethod
    def front_classes(cls) -> tuple[type[Front], ...]:
        """The fronts this miner may serve (:attr:`front_types`), each enabled by its own flags."""
        return discover() if cls.front_types is None else unique(cls.front_types)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        bt.Wallet.add_args(parser)
        bt.Subtensor.add_args(parser)
        bt.Axon.add_args(parser)
        bt.logging.add_args(parser)
        chain = group(parser, CHAIN)
        chain.add_argument("--netuid", type=at_least(0), default=1, help="Subnet to mine on (1 is prompting).")
        add_bool(chain, "--mock", default=False, help="Run on an in-process mock chain: no network, no registration.")
        chain.add_argument(
            "--neuron.sync_interval", type=at_least(0, float, inclusive=False), default=120.0,
            help="Seconds between refreshes of the registered hotkeys and stakes.",
        )
        chain.add_argument(
            "--neuron.idle_seconds", type=at_least(0, float, inclusive=False), default=20.0,
            help="Close a connection silent this long, from its start or between requests (outlives a "
            "dendrite's 15 s keep-alive), or still sending a request (headers or body) after it.",
        )
        chain.add_argument(
            "--neuron.max_connections", type=at_least(1), default=1000,
            help="Connections per front. At the limit a new connection takes the place of the oldest one "
            "not being answered (silent, or still sending its request); with all of them answering, HTTP 503.",
        )
        chain.add_argument(
            "--neuron.max_body_bytes", type=at_least(1024), default=2_000_000,
            help="Refuse larger request bodies with HTTP 413 (every front), before reading them whole.",
        )
        fronts = group(parser, FRONTS)
        kinds = cls.front_classes()
        for kind in kinds:
            kind.add_args(fronts)
        fronts.add_argument(
            "--advertise", choices=[kind.name for kind in kinds if kind.advertisable], default=None,
            help="The front whose port the chain publishes (default: the axon when served, else the first "
            "front served).",
        )
        answers = group(parser, ANSWERS)
        core.add_args(answers)
        system_prompts.add_args(answers)
        access.add_args(group(parser, ACCESS))

    # -- what subclasses implement --------------------------------------------------------------

    @abc.abstractmethod
    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        """Answer ``synapse`` as a streaming response."""

    @abc.abstractmethod
    async def prompt(self, synapse: StreamPromptingSynapse) -> StreamPromptingSynapse:
        """Answer ``synapse`` whole: fill ``completion`` and return it."""

    # -- what the axon calls (SN1's seed API) ---------------------------------------------------

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

    def can_answer(self) -> bool:
        """Whether a request would be answered now (a front may say so to validators); a miner
        whose model loads while it serves says no until it is loaded."""
        return True

    def choose_advertised(self) -> Front:
        """The front the chain publishes: ``--advertise`` (or a front's own flag asking for it), else
        the first served, in :meth:`front_classes`' order. Refuses a configuration serving nothing,
        or advertising a front it does not serve."""
        advertisable = [front for front in self.fronts if front.advertisable]
        if not advertisable:
            switches = ", ".join(kind.switch for kind in type(self).front_classes() if kind.advertisable)
            raise ConfigError(f"nothing to serve: every front is off (turn one on: {switches})")
        asked = [kind.name for kind in type(self).front_classes() if kind.advertise_asked(self.config)]
        wanted = self.config.advertise or next(iter(asked), None)
        if wanted is None:
            return advertisable[0]
        for front in advertisable:
            if front.name == wanted:
                return front
        served = ", ".join(front.name for front in self.fronts)
        raise ConfigError(f"--advertise {wanted}: that front is not served (served: {served})")

    @property
    def ports(self) -> list[int]:
        """The ports this miner serves on, one per enabled front."""
        return [front.port for front in self.fronts]

    @property
    def published(self) -> tuple[str | None, int]:
        """The IP and port the chain publishes for this miner: the advertised front's."""
        return self.advertised.published

    def check_ports(self) -> None:
        """Every front on its own port, each free now."""
        owners: dict[int, Front] = {}
        for front in self.fronts:
            other = owners.setdefault(front.port, front)
            if other is not front:
                raise ConfigError(f"{front.port_flag} {front.port} is the {other.label}'s port: pick another")
        for front in self.fronts:
            front.check_port()

    def start_axon(self) -> None:
        """Check, start and advertise every front; returns once each is listening.

        (The name is the seed template's: it starts every front, the axon among them.)
        """
        settings = self.config
        self.check_registered()
        self.check_ports()
        files = raise_file_limit()
        self.places = places_per_front(files, len(self.fronts), settings.neuron.max_connections)
        if self.places < settings.neuron.max_connections:
            bt.logging.warning(
                f"the open-file limit is {files}: {self.places} connections per front, not "
                f"--neuron.max_connections {settings.neuron.max_connections}; raise `ulimit -n`"
            )
        servers = [front.server() for front in self.fronts]
        for server in servers:
            harden(server.config, idle=settings.neuron.idle_seconds, max_connections=self.places, access=self.access)
        if not settings.mock:  # the mock chain keeps the axon's own port, which local dendrites dial
            self.axon.external_port = self.published[1]
            with chain_errors(self.config):
                self.axon.serve(netuid=settings.netuid, subtensor=self.subtensor)
        self.servers = Servers(servers)
        self.servers.start()
        for port in self.ports:
            if not wait_port(port, listening=True, timeout=10.0):
                self.stop_run_thread()
                raise StartupError(f"nothing started listening on port {port} within 10s")
        self.is_running = True
        bt.logging.info(f"serving: {self.summary()}")

    def summary(self) -> str:
        """Every served front with its address, the advertised one marked with what the chain publishes."""
        ip, port = self.published
        served = ", ".join(
            front.summary() + (f" (advertised: {ip}:{port})" if front is self.advertised else "")
            for front in self.fronts
        )
        if self.places < self.config.neuron.max_connections:  # the open-file limit bounds the places
            served += f" | {self.places} connections per front (open-file limit low: raise `ulimit -n`)"
        return served

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
        """Start :meth:`run` in a daemon thread; returns once every front listens."""
        if self._thread is not None:
            return
        self.exit_request.clear()
        self.start_axon()
        self._thread = threading.Thread(target=self.keep_synced, name="miner", daemon=True)
        self._thread.start()

    def keep_synced(self) -> None:
        """Refresh the registry every ``--neuron.sync_interval`` seconds until asked to exit."""
        while not self.exit_request.wait(self.config.neuron.sync_interval):
            self.sync()

    def request_exit(self) -> None:
        """Ask :meth:`run` (or the background thread) to stop; safe to call from a signal handler."""
        self.exit_request.set()

    def stop_run_thread(self, grace: float = 1.0) -> None:
        """Stop serving and return once every front's port is free.

        uvicorn waits for in-flight answers forever by default; a bounded grace period makes it
        cancel them, which also cancels their upstream requests and local generations.
        """
        self.exit_request.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.servers is None:
            return
        self.servers.stop(grace)
        self.servers = None
        self.is_running = False
        for port in self.ports:
            if not wait_port(port, listening=False, timeout=grace + 5):
                bt.logging.warning(f"port {port} still listens after stopping")

    def __enter__(self) -> "Miner":
        self.run_in_background_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_run_thread()
