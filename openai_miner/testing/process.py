"""The real ``openai-miner`` command in a child process: started, serving, stopped.

Tests, the benchmark and a subnet author's own checks need the same three steps, each easy to get
subtly wrong: start the installed command in an environment of its own (:func:`miner_env`), wait
until it serves (its summary line, ``openai-miner | network ...``, printed once every front
listens), and stop it as an operator does (SIGINT), killing it only if it hangs. Its output is read
by a thread, so the child never blocks on a full pipe and nobody waits on a sleep::

    with MinerProcess(miner_argv(tmp / "wallets", free_port(), "--fallback.off"), env=miner_env(tmp)) as miner:
        miner.ports["axon"], miner.hotkey  # parsed from the summary line
    miner.returncode  # 0: stopped cleanly
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Mapping, Sequence

SUMMARY = "openai-miner | network"
"""How the summary line starts (:func:`openai_miner.cli.summary`): from that line on, it serves."""
OWN_PREFIXES = ("OPENAI_", "BT_", "AXON_", "WALLET_")
"""Variables the command reads as settings: a child inherits none of the caller's."""


class MinerFailed(RuntimeError):
    """The command ended, or did not serve in time, before its summary line; the message ends with its output."""


def miner_command() -> list[str]:
    """The ``openai-miner`` installed beside this interpreter; where the package is only on
    ``PYTHONPATH`` (a copied checkout, as on the GPU machine), the same CLI run as a module."""
    installed = Path(sys.executable).with_name("openai-miner")
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "openai_miner.cli"]


def miner_env(home: str | Path, **variables: str) -> dict[str, str]:
    """This process's environment without the miner's own settings, with ``home`` as ``HOME``
    (bittensor writes ``~/.bittensor``; mock wallets go there) and no model download; then
    ``variables`` (``OPENAI_API_KEY=...``)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(OWN_PREFIXES)}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **variables)
    return env


class MinerProcess:
    """``openai-miner argv...`` in a child process, its output (stdout and stderr) in :attr:`log`.

    As a context manager it starts the command, returns once it serves (or raises
    :class:`MinerFailed` with its output) and stops it on the way out. ``log_file``: also write
    the output there, line by line, for a reader of its own (the benchmark's).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_file: str | Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.argv = list(argv)
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.log_file = None if log_file is None else Path(log_file)
        self.start_timeout = start_timeout
        self.summary: str | None = None
        self.process: "subprocess.Popen[str] | None" = None
        self._lines: list[str] = []
        self._summary_or_end = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> "MinerProcess":
        self.process = subprocess.Popen(
            [*miner_command(), *self.argv], cwd=self.cwd, env=self.env, text=True, bufsize=1,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name="openai-miner output", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        sink = None if self.log_file is None else self.log_file.open("w")
        try:
            for line in self.process.stdout:
                self._lines.append(line)
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if self.summary is None and line.startswith(SUMMARY):
                    self.summary = line.rstrip("\n")
                    self._summary_or_end.set()
        finally:
            if sink is not None:
                sink.close()
            self._summary_or_end.set()  # a waiter wakes to fail at once, not at its timeout

    def wait_serving(self, timeout: float | None = None) -> str:
        """The summary line, once printed; :class:`MinerFailed` if the command ends first or
        prints none within ``timeout`` seconds (default: ``start_timeout``)."""
        assert self.process is not None, "start() it first"
        timeout = self.start_timeout if timeout is None else timeout
        if self._summary_or_end.wait(timeout) and self.summary is not None:
            return self.summary
        if self._summary_or_end.is_set():
            why = f"exited with code {self.process.wait()} before serving"
        else:
            why = f"did not serve within {timeout:g} s"
        raise MinerFailed(f"openai-miner {why}:\n{self.log[-3000:]}")

    def stop(self, grace: float = 20.0, signum: int = signal.SIGINT) -> int:
        """Send ``signum`` (Ctrl-C's by default), kill it after ``grace`` seconds; its exit code,
        once all it printed is in :attr:`log`."""
        assert self.process is not None, "start() it first"
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self._reader is not None
        self._reader.join(timeout=10)  # a child of its own could still hold the pipe: do not hang on it
        return self.process.returncode

    def __enter__(self) -> "MinerProcess":
        self.start()
        try:
            self.wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def log(self) -> str:
        """Everything it printed so far, stdout and stderr as they came."""
        return "".join(self._lines)

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() it first"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def _fields(self) -> list[str]:
        if self.summary is None:
            raise MinerFailed("not serving yet: no summary line")
        return self.summary.split(" | ")

    @property
    def hotkey(self) -> str:
        """The miner's hotkey (ss58), from the summary line."""
        return self._fields[3].removeprefix("hotkey ")

    @property
    def ports(self) -> dict[str, int]:
        """The port of every front served, by name (``axon``, ``http``, ``sn78``...), from the summary line."""
        served = {}
        for front in self._fields[4].split(", "):
            name, address = front.split(" ")[:2]
            served[name] = int(address.rsplit(":", 1)[1])
        return served
