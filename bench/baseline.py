"""The baseline: the streaming pattern SN1's reference miners shipped, on this project's axon.

SN1's OpenAI miner built a LangChain chain (``prompt | ChatOpenAI | StrOutputParser``) and, inside
the ``async`` token streamer handed to ``create_streaming_response``, iterated its SYNCHRONOUS
``chain.stream(...)``, sending every ``streaming_batch_size`` tokens with ``await send(...)``.
Each wait for the next token blocks the axon's one event loop, so while one validator's answer
is waiting for its upstream, no other validator's request is read, verified or answered.

Everything else is this project's, so the comparison isolates the token path: the same synapse,
axon, middleware, blacklist and chat messages (:class:`~openai_miner.miner.OpenAIMiner`), the
same model settings, and the same upstream. Two deliberate differences from SN1's code, both in
the baseline's favour: empty tokens (the role chunk) are not counted towards a batch, and the
last batch goes out with ``more_body: True`` (bittensor ends the stream itself; sending
``more_body: False`` first makes uvicorn raise after the answer).

No ``from __future__ import annotations``: this module defines a miner's ``forward``.
"""

import time
from typing import Any

import bittensor as bt
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from starlette.types import Send

from openai_miner.fronts import axon
from openai_miner.fronts.axon import StreamingResponse
from openai_miner.miner import OpenAIMiner
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.sources.openai import langchain_messages


class BaselineMiner(OpenAIMiner):
    """``OpenAIMiner`` with SN1's token streamer: a sync LangChain stream inside the async streamer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.config.openai
        model = ChatOpenAI(  # the sync client: ``.stream()`` reads the upstream with blocking I/O
            model=settings.model_name,
            api_key=self.api_key or SecretStr("EMPTY"),
            base_url=settings.base_url,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            timeout=settings.timeout,
            max_retries=0,
            streaming=True,
        )
        self.chain: Runnable = model | StrOutputParser()

    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        messages = langchain_messages(axon.question(self.core, synapse).messages)
        batch_size = self.config.neuron.streaming_batch_size
        init_time = time.time()
        timeout_threshold = synapse.timeout or 12.0

        async def _forward(send: Send) -> None:
            buffer: list[str] = []
            try:
                for token in self.chain.stream(messages):  # blocks the event loop between tokens
                    if not token:
                        continue
                    buffer.append(token)
                    if time.time() - init_time > timeout_threshold:
                        break
                    if len(buffer) == batch_size:
                        body = "".join(buffer).encode("utf-8")
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                        buffer = []
                if buffer:
                    body = "".join(buffer).encode("utf-8")
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            except Exception as error:  # SN1 logged and ended the stream
                bt.logging.error(f"baseline stream failed: {type(error).__name__}: {error}")

        return synapse.create_streaming_response(_forward)
