"""The base ``Miner``: wallet, chain, registry, axon, blacklist, priority and the run loop.

Subclasses supply the answer (:meth:`Miner.forward`, :meth:`Miner.prompt`). Everything here is
the part every subnet-1 miner needs and few get right: refusing unregistered callers before any
work, serving the axon, keeping the registry fresh, and stopping cleanly.

No ``from __future__ import annotations`` here: bittensor's ``Axon.attach`` compares the real
annotation objects of ``forward``/``blacklist``/``priority``.
"""

import abc
import argparse
import contextlib
import hashlib
import os
import socket
import threading
import time
import typing
from collections import OrderedDict
from typing import Iterator, Mapping, Sequence

import bittensor as bt
import fastapi
from bittensor.core.errors import SynapseException

from openai_miner.access import AccessPolicy, RateLimiter
from openai_miner.access import blacklist as decide_blacklist
from openai_miner.access import priority as stake_priority
from openai_miner.chain import Registry, fetch_registry, mock_subtensor, register_mock_neuron
from openai_miner.config import add_bool, at_least, build_config
from openai_miner.protocol import StreamPromptingSynapse

StreamingResponse = StreamPromptingSynapse.BTStreamingResponse


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
        f"(missing {', '.join(missing)}): create it with {create}, point --wallet.name, "
        "--wallet.hotkey or --wallet.path at an existing one, or try it offline with --mock"
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


def refuse(synapse: StreamPromptingSynapse, status: int, reason: str) -> SynapseException:
    """An error the axon turns into an HTTP ``status`` response carrying ``reason`` to the validator."""
    if synapse.axon is not None:
        synapse.axon.status_code = status
        synapse.axon.status_message = reason
    return SynapseException(reason, synapse=synapse)


class RecentPrompts:
    """Refuses the same conversation twice within ``window`` seconds (off when ``window`` is 0)."""

    def __init__(self, window: float, clock: typing.Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    @staticmethod
    def key(messages: Sequence[str]) -> str:
        digest = hashlib.sha256()
        for message in messages:
            digest.update(message.encode("utf-8", errors="surrogatepass"))
            digest.update(b"\x00")
        return digest.hexdigest()

    def check_and_remember(self, messages: Sequence[str]) -> bool:
        """True if this conversation is new within the window (and remember it), else False."""
        if self.window <= 0:
            return True
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now - self.window:
            self._seen.popitem(last=False)
        key = self.key(messages)
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


class Arrivals:
    """When each admitted request reached the axon, by (hotkey, nonce), on this machine's clock.

    The answer's deadline counts from arrival, not from when ``forward`` finally runs: under load
    the axon's middleware can take tens of milliseconds, which the deadline margin must not lose.
    Entries of requests that never reach ``forward`` (refused at signature checks) age out.
    """

    def __init__(self, clock: typing.Callable[[], float] = time.monotonic, keep: float = 120.0) -> None:
        self._clock = clock
        self._keep = keep
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()

    def note(self, hotkey: str | None, nonce: int | None) -> None:
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) < now - self._keep:
            self._seen.popitem(last=False)
        self._seen[(hotkey or "", nonce or 0)] = now

    def pop(self, hotkey: str | None, nonce: int | None) -> float:
        """The arrival time, or now if the request was never noted."""
        return self._seen.pop((hotkey or "", nonce or 0), None) or self._clock()


def ensure_port_free(port: int) -> None:
    """Fail loudly: a busy axon port otherwise dies silently inside uvicorn's thread."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise PortBusy(
                f"axon port {port} is busy ({exc.strerror}); stop whatever uses it or pass --axon.port"
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


class Axon(bt.Axon):
    """bittensor's axon, answering a malformed body with 400 and a reason instead of an opaque 500."""

    async def verify_body_integrity(self, request: fastapi.Request) -> dict:
        try:
            return await super().verify_body_integrity(request)
        except (ValueError, TypeError) as error:  # JSON, UTF-8, field types, body-hash mismatch
            raise fastapi.HTTPException(400, f"invalid synapse body ({type(error).__name__})") from None


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
        self.policy = AccessPolicy(
            allow_non_registered=self.config.blacklist.allow_non_registered,
            force_validator_permit=self.config.blacklist.force_validator_permit,
            min_stake=self.config.blacklist.min_stake,
            whitelist=frozenset(self.config.blacklist.whitelist or ()),
        )
        self.registry: Registry = fetch_registry(self.subtensor, netuid)
        self.recent_prompts = RecentPrompts(self.config.neuron.prompt_cache_seconds)
        self.rate_limiter = RateLimiter(self.config.blacklist.max_requests_per_minute)
        self.arrivals = Arrivals()
        self.axon = axon or Axon(
            wallet=self.wallet,
            config=self.config,
            external_ip=self.config.axon.external_ip or ("127.0.0.1" if self.config.mock else None),
        )
        self._exit = threading.Event()
        self._thread: threading.Thread | None = None
        self.is_running = False

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
            "--neuron.streaming_batch_size", type=at_least(1), default=12,
            help="Tokens per streamed chunk (SN1 validators penalise chunks over 200 tokens).",
        )
        add_bool(
            parser, "--neuron.stop_on_forward_exception", default=False,
            help="Stop the miner when answering a request fails.",
        )
        parser.add_argument(
            "--neuron.deadline_margin", type=at_least(0, float), default=0.5,
            help="Seconds before the validator's timeout at which the answer so far is flushed.",
        )
        parser.add_argument(
            "--neuron.max_prompt_chars", type=at_least(1), default=100_000,
            help="Refuse conversations longer than this many characters.",
        )
        parser.add_argument(
            "--neuron.prompt_cache_seconds", type=at_least(0, float), default=0.0,
            help="Refuse a conversation repeated within this many seconds (0 = off).",
        )
        parser.add_argument(
            "--neuron.sync_interval", type=at_least(0, float, inclusive=False), default=120.0,
            help="Seconds between refreshes of the registered hotkeys and stakes.",
        )
        add_bool(
            parser, "--blacklist.allow_non_registered", default=False,
            help="Serve hotkeys that are not registered on the subnet.",
        )
        add_bool(
            parser, "--blacklist.force_validator_permit", default=True,
            help="Refuse registered hotkeys without a validator permit.",
        )
        parser.add_argument(
            "--blacklist.whitelist", type=str, nargs="*", default=[], metavar="HOTKEY",
            help="Hotkeys always served.",
        )
        parser.add_argument(
            "--blacklist.min_stake", type=at_least(0, float), default=0.0,
            help="Refuse hotkeys with less stake than this (TAO).",
        )
        parser.add_argument(
            "--blacklist.max_requests_per_minute", type=at_least(0), default=600,
            help="Requests one hotkey may make per minute before getting HTTP 429 (0 = no limit; "
            "whitelisted hotkeys are not limited).",
        )

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
        hotkey = synapse.dendrite.hotkey if synapse.dendrite else None
        if hotkey not in self.policy.whitelist and not self.rate_limiter.allow(hotkey or ""):
            raise refuse(
                synapse, 429,
                f"more than {self.rate_limiter.per_minute} requests in a minute from this hotkey",
            )
        if not self.recent_prompts.check_and_remember(synapse.messages):
            raise refuse(
                synapse, 429,
                f"the same conversation was asked within {self.recent_prompts.window:g}s",
            )
        return self.forward(synapse)

    def blacklist(self, synapse: StreamPromptingSynapse) -> typing.Tuple[bool, str]:
        hotkey = synapse.dendrite.hotkey if synapse.dendrite else None
        refused, reason = decide_blacklist(hotkey, self.registry, self.policy)
        if refused:
            bt.logging.debug(f"blacklisted: {reason}")
        else:
            self.arrivals.note(hotkey, synapse.dendrite.nonce if synapse.dendrite else None)
        return refused, reason

    def priority(self, synapse: StreamPromptingSynapse) -> float:
        return stake_priority(synapse.dendrite.hotkey if synapse.dendrite else None, self.registry)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    def sync(self) -> None:
        """Refresh the registry; a failed refresh keeps the last good one."""
        try:
            self.registry = fetch_registry(self.subtensor, self.config.netuid)
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
