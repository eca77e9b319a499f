"""openai-miner: any OpenAI-compatible chat model as a streaming Bittensor miner, on two fronts."""

__version__ = "0.1.0"  # first: the modules below read it

from openai_miner.base import Miner  # noqa: E402
from openai_miner.miner import OpenAIMiner  # noqa: E402
from openai_miner.protocol import StreamPromptingSynapse  # noqa: E402
from openai_miner.sources.base import TokenSource  # noqa: E402

__all__ = ["Miner", "OpenAIMiner", "StreamPromptingSynapse", "TokenSource"]
