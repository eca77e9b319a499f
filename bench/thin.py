"""The thin reference: the least a miner can do on bittensor's axon to stream an upstream's answer.

Its ``forward`` posts the question to the upstream with one shared httpx client, reads the SSE
lines as they come, takes each ``data:`` line's content with ``json.loads`` and sends a batch each
time ``--neuron.streaming_batch_size`` tokens are in: no LangChain, no openai SDK, no retries,
deadline, policy or drain. Everything else is this project's (:class:`~openai_miner.miner.OpenAIMiner`:
the same synapse, axon, middleware and blacklist), so that this miner's tokens/s over the
reference's is what its token path costs, and nothing else.

No ``from __future__ import annotations``: this module defines a miner's ``forward``.
"""

import json
from typing import Any

import bittensor as bt
import httpx
from starlette.types import Send

from openai_miner.fronts import axon
from openai_miner.fronts.axon import StreamingResponse
from openai_miner.miner import OpenAIMiner
from openai_miner.protocol import StreamPromptingSynapse


class ThinMiner(OpenAIMiner):
    """``OpenAIMiner`` whose answer is the upstream's SSE parsed by hand, batch by batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: httpx.AsyncClient | None = None  # made on the axon's event loop, at first use

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            settings = self.config.openai
            self._client = httpx.AsyncClient(
                base_url=settings.base_url, timeout=settings.timeout, limits=httpx.Limits(max_connections=None),
                headers={"Authorization": f"Bearer {self.api_key.get_secret_value() if self.api_key else 'EMPTY'}"},
            )
        return self._client

    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        messages = axon.question(self.core, synapse).messages
        settings = self.config.openai
        body = {
            "model": settings.model_name, "stream": True, "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "messages": [{"role": message.role, "content": message.content} for message in messages],
        }
        batch_size = self.config.neuron.streaming_batch_size

        async def _forward(send: Send) -> None:
            buffer: list[str] = []
            try:
                async with self.client().stream("POST", "chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        for choice in json.loads(line[6:]).get("choices") or ():
                            if token := (choice.get("delta") or {}).get("content"):
                                buffer.append(token)
                        if len(buffer) >= batch_size:
                            await send({"type": "http.response.body", "body": "".join(buffer).encode(), "more_body": True})
                            buffer = []
                if buffer:
                    await send({"type": "http.response.body", "body": "".join(buffer).encode(), "more_body": True})
            except Exception as error:
                bt.logging.error(f"thin reference failed: {type(error).__name__}: {error}")

        return synapse.create_streaming_response(_forward)
