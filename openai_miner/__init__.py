"""openai-miner: any OpenAI-compatible chat model as a streaming Bittensor miner, on two fronts.

The public names load on first use (PEP 562): ``import openai_miner`` alone, as ``openai-miner
--version`` does, costs no bittensor, uvicorn or LangChain import (seconds on a small machine).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from openai_miner.base import Miner
    from openai_miner.miner import OpenAIMiner
    from openai_miner.protocol import StreamPromptingSynapse
    from openai_miner.sources.base import TokenSource

_HOMES = {
    "Miner": "openai_miner.base",
    "OpenAIMiner": "openai_miner.miner",
    "StreamPromptingSynapse": "openai_miner.protocol",
    "TokenSource": "openai_miner.sources.base",
}

__all__ = ["Miner", "OpenAIMiner", "StreamPromptingSynapse", "TokenSource"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'openai_miner' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # once: later lookups never come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
