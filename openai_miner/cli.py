"""The ``openai-miner`` command: configure, say what is being served, serve until stopped.

``openai-miner demo "prompt"`` instead runs a throwaway miner and validator on this machine and
prints one streamed answer (:mod:`openai_miner.demo`).

Start-up fails loudly, with the reason and the fix, before serving anything. Exit codes:

- 0: stopped normally (Ctrl-C / SIGINT).
- 1: stopped by a failure at run time (e.g. ``--neuron.stop_on_forward_exception``), or could
  not start for another reason (the message says which).
- 2: bad configuration: a flag (argparse), an environment variable or the ``.env`` file is
  unreadable or has a bad value.
- 3: the hotkey is not registered on the subnet.
- 4: the axon port is busy.
- 5: the wallet (coldkeypub or hotkey file) does not exist; checked before connecting to the chain.
- 6: the chain (subtensor endpoint) cannot be reached.
- 130: interrupted (Ctrl-C) before the miner started serving, e.g. while loading the local model.

``openai-miner demo`` uses the same codes, with 1 also meaning that a validator got no answer and
130 an interrupted demo.
"""

import contextlib
import os
import socket
import sys
import time
from typing import Iterator, Sequence

import bittensor as bt

from openai_miner.config import ConfigError, env_name
from openai_miner.miner import OpenAIMiner
from openai_miner.neuron import StartupError


class WalletMissing(StartupError):
    """The wallet's keys are not on this machine: nothing can be signed, so the miner does not start."""

    exit_code = 5


class ChainUnreachable(StartupError):
    """The subtensor endpoint cannot be reached (offline, wrong ``--subtensor.network``)."""

    exit_code = 6


class _CommandLine(OpenAIMiner):
    """Subnet-1 miner streaming answers from OpenAI or any OpenAI-compatible server.

    Try it first with no chain, no wallet and no key: openai-miner demo "your prompt" (see
    openai-miner demo --help).
    """


def summary(miner: OpenAIMiner) -> str:
    config = miner.config
    return (
        f"openai-miner | network {'mock' if config.mock else config.subtensor.network} | "
        f"netuid {config.netuid} | hotkey {miner.wallet.hotkey.ss58_address} | "
        f"axon {miner.axon.external_ip}:{miner.axon.external_port} | backend {miner.backend()} | "
        f"batch {config.neuron.streaming_batch_size} tokens"
    )


# (setting, smallest allowed value, whether the smallest value itself is allowed)
_LIMITS = (
    ("netuid", 0, True),
    ("neuron.streaming_batch_size", 1, True),
    ("neuron.deadline_margin", 0, True),
    ("neuron.max_prompt_chars", 1, True),
    ("neuron.prompt_cache_seconds", 0, True),
    ("neuron.sync_interval", 0, False),
    ("blacklist.min_stake", 0, True),
    ("openai.temperature", 0, True),
    ("openai.max_tokens", 1, True),
    ("openai.timeout", 0, False),
    ("openai.max_retries", 0, True),
    ("fallback.max_new_tokens", 1, True),
    ("fallback.concurrency", 1, True),
    ("fallback.failures", 1, True),
    ("fallback.cooldown", 0, True),
)


def _get(config: bt.Config, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        node = node.get(part) if node is not None else None  # type: ignore[attr-defined]
    return node


def check_config(config: bt.Config) -> None:
    """Values argparse accepts but the miner cannot use: one ConfigError naming each of them."""
    problems = []
    for dotted, low, inclusive in _LIMITS:
        value = _get(config, dotted)
        if value is None or (value >= low if inclusive else value > low):  # type: ignore[operator]
            continue
        bound = f"at least {low}" if inclusive else f"greater than {low}"
        problems.append(f"--{dotted} (or {env_name(dotted)}) is {value}, must be {bound}")
    port = _get(config, "axon.port")
    if port is not None and not 1024 < port < 65535:  # type: ignore[operator]
        problems.append(f"--axon.port (or AXON_PORT) is {port}, must be between 1025 and 65534")
    if problems:
        raise ConfigError("; ".join(problems))


def check_wallet(config: bt.Config) -> bt.Wallet:
    """The wallet, if its coldkeypub and hotkey files exist; checked before any chain access."""
    wallet = bt.Wallet(config=config)
    missing = [
        keyfile.path
        for keyfile in (wallet.coldkeypub_file, wallet.hotkey_file)
        if not keyfile.exists_on_device()
    ]
    if missing:
        coldkey_missing = not wallet.coldkeypub_file.exists_on_device()
        create = (
            f"`btcli wallet create --wallet.name {wallet.name} --wallet.hotkey {wallet.hotkey_str}`"
            if coldkey_missing
            else f"`btcli wallet new_hotkey --wallet.name {wallet.name} --wallet.hotkey {wallet.hotkey_str}`"
        )
        raise WalletMissing(
            f"wallet {wallet.name}/{wallet.hotkey_str} not found under {os.path.expanduser(config.wallet.path)} "
            f"(missing {', '.join(missing)}): create it with {create}, point --wallet.name, "
            "--wallet.hotkey or --wallet.path at an existing one, or try it offline with --mock"
        )
    return wallet


@contextlib.contextmanager
def chain_errors(config: bt.Config) -> Iterator[None]:
    """A chain that cannot be reached (at construction or when serving the axon) is a clear error."""
    try:
        yield
    except ConnectionError as error:
        network = config.subtensor.network
        endpoint = config.subtensor.get("chain_endpoint") or network
        raise ChainUnreachable(
            f"cannot reach the chain ({network} at {endpoint}): {error}; check the network, "
            "--subtensor.network / --subtensor.chain_endpoint, or try it offline with --mock"
        ) from error


def wait_port_closed(port: int, timeout: float) -> bool:
    """True once nothing accepts connections on ``port`` (the axon's thread ends after ``stop()``)."""
    end = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)


def stop_miner(miner: OpenAIMiner, grace: float = 1.0) -> None:
    """Stop the miner and wait until its port is released.

    uvicorn waits for in-flight answers forever by default; a bounded grace period makes it cancel
    them instead, which also stops a local generation still running for a validator that left.
    """
    server = getattr(miner.axon, "fast_server", None)
    serving = server is not None and server.is_running  # not when start-up failed (a busy port...)
    if serving:
        server.config.timeout_graceful_shutdown = grace
    miner.stop_run_thread()
    if serving and not wait_port_closed(miner.axon.port, grace + 5):
        print(f"openai-miner: the axon still listens on port {miner.axon.port}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        from openai_miner import demo

        return demo.main(args[1:])
    miner: OpenAIMiner | None = None
    try:
        config = _CommandLine.config(args)
        check_config(config)
        if not config.mock:
            check_wallet(config)
        with chain_errors(config):
            miner = OpenAIMiner(config)
            miner.start_axon()
    except KeyboardInterrupt:
        print("openai-miner: interrupted during start-up", file=sys.stderr)
        if miner is not None:
            miner.stop_run_thread()
        return 130
    except ConfigError as error:
        print(f"openai-miner: configuration error: {error}", file=sys.stderr)
        return 2
    except StartupError as error:
        print(f"openai-miner: {error}", file=sys.stderr)
        if miner is not None:
            miner.stop_run_thread()
        return error.exit_code
    bt.logging.info(summary(miner))
    print(summary(miner), flush=True)
    try:
        miner.keep_synced()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_miner(miner)
    # keep_synced returns only when the miner itself asked to stop
    print(
        "openai-miner: stopped by the miner itself (--neuron.stop_on_forward_exception after a failed "
        "answer; see the log above)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
