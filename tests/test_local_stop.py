"""Issue 21 item 6: a miner stopped while its local model generates exits cleanly.

Its batch thread was a daemon torn down by the interpreter mid-step, which printed
``terminate called without an active exception`` and aborted. The real ``openai-miner`` command,
answering from the local model, is stopped by SIGTERM once a validator holds a first chunk: the
model is generating then (its answer ends far later). The real default model: the tiny test model's
steps are too small to run on several native threads, and it never aborted.
"""

import asyncio
import signal
import threading
from pathlib import Path

import bittensor as bt
import pytest

from openai_miner.sources.local_model import default_model
from openai_miner.testing.localnet import OPEN_TO_ALL, axon_info, free_port, miner_argv
from openai_miner.testing.process import MinerProcess
from openai_miner.testing.validator import ask
from tests.helpers import cli_env

def local_miner(tmp_path: Path, model: str, *extra: str) -> MinerProcess:
    """The real command, answering from the local model, one token a chunk."""
    argv = miner_argv(
        tmp_path / "wallets", free_port(), *OPEN_TO_ALL, "--fallback.model", model, "--fallback.device", "cpu",
        "--neuron.streaming_batch_size", "1", *extra,
    )
    return MinerProcess(argv, env=cli_env(tmp_path), cwd=tmp_path, start_timeout=300)


async def stop_at_first_chunk(miner: MinerProcess, wallets: Path) -> None:
    """Ask for a long answer and send SIGTERM (once) as its first chunk arrives."""
    coldkey = bt.Wallet(name="miner", hotkey="default", path=str(wallets)).coldkeypub.ss58_address
    axon = axon_info(miner.ports["axon"], miner.hotkey, coldkey)
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
    miner = local_miner(tmp_path, default_model(), "--fallback.max_new_tokens", "4000", "--fallback.threads", "2")
    try:
        miner.start().wait_serving()
        asyncio.run(stop_at_first_chunk(miner, tmp_path / "wallets"))
        code = miner.process.wait(timeout=60)
    finally:
        miner.stop()  # all it printed; a kill if the stop above hung
    printed = miner.log
    assert "terminate called" not in printed and "Traceback" not in printed, printed[-3000:]
    assert code == 0 and "openai-miner: stopped after" in printed, printed[-3000:]
