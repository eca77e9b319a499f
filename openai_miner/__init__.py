"""openai-miner: any OpenAI-compatible chat model as a streaming Bittensor subnet-1 miner."""

from openai_miner.base import Miner
from openai_miner.miner import OpenAIMiner
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.sources.base import TokenSource

__all__ = ["Miner", "OpenAIMiner", "StreamPromptingSynapse", "TokenSource"]
__version__ = "0.1.0"
