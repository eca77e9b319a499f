"""Issue 21 item 6: a miner stopped while its local model generates exits cleanly.

Its batch thread was a daemon torn down by the interpreter mid-step, which printed
``terminate called without an active exception`` and aborted. The real ``openai-miner`` command,
answering from the local model, is stopped by SIGTERM once a validator holds a first chunk: the
model is generating then (its answer ends far later). The real default model: the tiny test model's
steps are too small to run on several native threads, and it never aborted.
"""

import asyncio
import signal
import subprocess
import sys
import threading
from pathlib import Path

import bittensor as bt
import pytest

from openai_miner.sources.local_model import default_model
from openai_miner.testing.localnet import OPEN_TO_ALL, axon_info, free_port, miner_argv
from openai_miner.testing.validator import ask
from tests.helpers import cli_env

MINER_CLI = str(Path(sys.executable).with_name("openai-miner"))


class Miner:
    """The real command, answering from the local model; its output read in a thread, so that it
    never blocks on a full pipe and the test can wait for its summary line."""

    def __init__(self, tmp_path: Path, model: str, *extra: str) -> None:
        self.port = free_port()
        self.wallets = tmp_path / "wallets"
        argv = miner_argv(
            self.wallets, self.port, *OPEN_TO_ALL, "--fallback.model", model, "--fallback.device", "cpu",
            "--neuron.streaming_batch_size", "1", *extra,
        )
        self.process = subprocess.Popen(
            [MINER_CLI, *argv], cwd=tmp_path, env=cli_env(tmp_path), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.output: list[str] = []
        self.serving = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("openai-miner |"):
                self.serving.set()
        self.serving.set()  # ended without serving: the test fails on its exit, with its output

    def printed(self) -> str:
        self.reader.join(timeout=10)
        return "".join(self.output)


async def stop_at_first_chunk(miner: Miner) -> None:
    """Ask for a long answer and send SIGTERM (once) as its first chunk arrives."""
    wallet = bt.Wallet(name="miner", hotkey="default", path=str(miner.wallets))
    axon = axon_info(miner.port, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    sent = threading.Event()

    def on_chunk(_: str) -> None:
        if not sent.is_set():
            sent.set()
            miner.process.send_signal(signal.SIGTERM)

    async with bt.Dendrite(wallet=bt.Keypair.create_from_uri("//Validator")) as dendrite:
        await ask(dendrite, axon, ["user"], ["tell me a long story"], 60.0, on_chunk=on_chunk)
    assert sent.is_set(), "no chunk came: the model never generated"


@pytest.mark.slow
@pytest.mark.skipif(default_model() is None, reason="the default model's package is not installed")
def test_a_stop_while_the_local_model_generates_is_clean(tmp_path: Path) -> None:
    # Two threads per step, as on any machine with three cores or more.
    miner = Miner(tmp_path, default_model(), "--fallback.max_new_tokens", "4000", "--fallback.threads", "2")
    try:
        miner.serving.wait(timeout=300)
        assert miner.process.poll() is None, miner.printed()[-3000:]
        asyncio.run(stop_at_first_chunk(miner))
        code = miner.process.wait(timeout=60)
    finally:
        if miner.process.poll() is None:
            miner.process.kill()
    printed = miner.printed()
    assert "terminate called" not in printed and "Traceback" not in printed, printed[-3000:]
    assert code == 0 and "openai-miner: stopped after" in printed, printed[-3000:]
