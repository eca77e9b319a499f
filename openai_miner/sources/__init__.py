"""Token sources: where the words come from.

Every source implements :class:`TokenSource`. The miner never cares which one answers: the single
drain in :mod:`openai_miner.streaming` reads the queue a source fills, batches and sends.
"""

from openai_miner.sources.base import TokenSource, UpstreamError

__all__ = ["TokenSource", "UpstreamError"]
