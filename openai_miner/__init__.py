"""openai-miner: any OpenAI-compatible chat model as a streaming Bittensor subnet-1 miner."""

from openai_miner.miner import OpenAIMiner
from openai_miner.neuron import Miner
from openai_miner.protocol import StreamPromptingSynapse

__all__ = ["Miner", "OpenAIMiner", "StreamPromptingSynapse"]
__version__ = "0.1.0"
