"""openai-miner: any OpenAI-compatible chat model as a streaming Bittensor subnet-1 miner.

The public names are imported on first use, so tools such as ``python -m openai_miner.loopback``
do not pay for importing bittensor.
"""

from importlib import import_module
from typing import Any

__all__ = ["Miner", "OpenAIMiner", "StreamPromptingSynapse"]
__version__ = "0.1.0"

_HOMES = {
    "Miner": "openai_miner.neuron",
    "OpenAIMiner": "openai_miner.miner",
    "StreamPromptingSynapse": "openai_miner.protocol",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'openai_miner' has no attribute {name!r}")
