"""The ``openai-miner`` command: configure, say what is being served, serve until stopped.

``openai-miner demo "prompt"`` instead runs a throwaway miner and validator on this machine and
prints one streamed answer (:mod:`openai_miner.demo`).

Start-up fails loudly, with the reason and the fix, before serving anything. Exit codes:

- 0: stopped normally (Ctrl-C, SIGINT or SIGTERM).
- 1: stopped by a failure at run time (e.g. ``--neuron.stop_on_forward_exception``), or could
  not start for another reason (the message says which).
- 2: bad configuration: a flag, an environment variable or the ``.env`` file is unreadable or
  has a bad value.
- 3: the hotkey is not registered on the subnet.
- 4: a front's port (the axon's, the HTTP or SN78 front's) is busy.
- 5: the wallet (coldkeypub or hotkey file) does not exist; checked before connecting to the chain.
- 6: the chain (subtensor endpoint) cannot be reached.
- 130: interrupted before the miner started serving, e.g. while loading the local model.

``openai-miner demo`` uses the same codes, with 1 also meaning that a validator got no answer.

The run logs to one stream, stdout (:mod:`openai_miner.logs`): its log, its summary line and its
stop line; only the message of a failure to start goes to stderr.

The miner's modules (bittensor, uvicorn, LangChain: seconds to import on a small machine) load
inside :func:`main`, so that ``openai-miner --version`` answers at once.
"""

from __future__ import annotations

import gc
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Sequence

from openai_miner import __version__

if TYPE_CHECKING:
    from openai_miner.miner import OpenAIMiner

EPILOG = 'Try it first with no chain, no wallet and no key: openai-miner demo "your prompt".'
INTERRUPTED = 130


def exit_code(error: BaseException) -> tuple[int, str]:
    """The documented exit code of a start-up failure, and what to print for it."""
    from openai_miner.config import ConfigError
    from openai_miner.startup import StartupError

    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    if isinstance(error, ConfigError):
        return 2, f"configuration error: {error}"
    if isinstance(error, StartupError):
        return error.exit_code, str(error)
    raise error


def summary(miner: OpenAIMiner) -> str:
    config = miner.config
    budget = miner.core.budget
    spend = f" | upstream budget {budget.limit:,} tokens a day, {budget.spent:,} spent today" if budget else ""
    return (
        f"openai-miner | network {'mock' if config.mock else config.subtensor.network} | "
        f"netuid {config.netuid} | hotkey {miner.wallet.hotkey.ss58_address} | "
        f"{miner.summary()} | backend {miner.backend()}{spend} | "
        f"batch {config.neuron.streaming_batch_size} tokens"
    )


def stopped(miner: OpenAIMiner) -> str:
    stats = miner.core.stats
    return f"openai-miner: stopped after {stats.answers.total()} answers ({stats.tokens} tokens)"


class Signals:
    """SIGINT and SIGTERM (Ctrl-C, pm2, systemd, docker stop) for the real command.

    Before the miner serves, a signal interrupts whatever is running, a model load included. Once
    it serves, a signal only asks it to stop: an exception raised at an arbitrary point of the run
    loop can leave a lock held, and the stop then hangs (it did, for a signal on the summary line).
    """

    def __init__(self) -> None:
        self.miner: OpenAIMiner | None = None
        self.received = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)

    def watch(self, miner: OpenAIMiner) -> None:
        """Stop ``miner`` on a signal, even one the kernel gives a thread other than the main one."""
        self.miner = miner
        signal.set_wakeup_fd(miner.exit_request.fileno(), warn_on_full_buffer=False)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.miner is None or not self.miner.is_running:
            raise KeyboardInterrupt
        self.received = True
        self.miner.request_exit()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:  # what the parser's own --version prints, without importing the miner
        print(f"openai-miner {__version__}")
        return 0
    if args[:1] == ["demo"]:
        from openai_miner import demo

        return demo.main(args[1:])
    from openai_miner import logs
    from openai_miner.config import ConfigError
    from openai_miner.miner import OpenAIMiner
    from openai_miner.startup import StartupError

    signals = Signals()
    own_signals = argv is None  # only the real command owns the process's signals
    if own_signals:
        signals.install()
    miner: OpenAIMiner | None = None
    try:
        config = OpenAIMiner.config(args, epilog=EPILOG)
        if own_signals and not (config.logging.debug or config.logging.trace):
            config.logging.info = True  # the real command says what it does: loading, serving, stopping
        miner = OpenAIMiner(config)
        if own_signals:
            signals.watch(miner)
        miner.start_axon()
    except (KeyboardInterrupt, ConfigError, StartupError) as error:
        code, message = exit_code(error)
        print(f"openai-miner: {message}{' during start-up' * (code == INTERRUPTED)}", file=sys.stderr)
        return code
    finally:
        if miner is not None and not miner.is_running:
            miner.stop_run_thread()
    try:  # from here a stop signal, however early, is a clean stop
        logs.say(summary(miner))  # whole, on the log's stream: never merged with a line logged meanwhile
        # Start-up objects (bittensor, torch, the model) never die: keep them out of full collections,
        # which otherwise stall every stream for 100-150 ms every ~130 requests (measured in bench/).
        gc.freeze()
        miner.keep_synced()
    except KeyboardInterrupt:  # called in-process (main(argv)), where the signals stay Python's
        return 0
    finally:
        miner.stop_run_thread()
        logs.say(stopped(miner))
    if signals.received:
        return 0
    # keep_synced returns only when the miner itself asked to stop
    logs.say(
        "openai-miner: stopped by the miner itself (--neuron.stop_on_forward_exception after a failed "
        "answer; see the log above)"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
