"""The ``openai-miner`` command: configure, say what is being served, serve until stopped.

Exit codes: 0 stopped normally, 1 failed at run time, 2 bad configuration (flag, variable or
``.env``), 3 hotkey not registered, 4 axon port busy.
"""

import sys
from typing import Sequence

import bittensor as bt

from openai_miner.config import ConfigError
from openai_miner.miner import OpenAIMiner
from openai_miner.neuron import StartupError


def summary(miner: OpenAIMiner) -> str:
    config = miner.config
    return (
        f"openai-miner | network {'mock' if config.mock else config.subtensor.network} | "
        f"netuid {config.netuid} | hotkey {miner.wallet.hotkey.ss58_address} | "
        f"axon {miner.axon.external_ip}:{miner.axon.external_port} | backend {miner.backend()} | "
        f"batch {config.neuron.streaming_batch_size} tokens"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = OpenAIMiner.config(argv)
        miner = OpenAIMiner(config)
        miner.start_axon()
    except ConfigError as error:
        print(f"openai-miner: configuration error: {error}", file=sys.stderr)
        return 2
    except StartupError as error:
        print(f"openai-miner: {error}", file=sys.stderr)
        return error.exit_code
    bt.logging.info(summary(miner))
    print(summary(miner), flush=True)
    try:
        miner.keep_synced()
    except KeyboardInterrupt:
        pass
    finally:
        miner.stop_run_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
