"""openai-miner: any OpenAI-compatible chat model as a streaming Bittensor miner, on fronts of one core.

The public names load on first use (PEP 562): ``import openai_miner`` alone, as ``openai-miner
--version`` does, costs no bittensor, uvicorn or LangChain import (seconds on a small machine).
"""

from typing import TYPE_CHECKING

from openai_miner.lazy import exports

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


__getattr__, __dir__ = exports(__name__, _HOMES)
