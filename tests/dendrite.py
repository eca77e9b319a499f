"""The validator side of end-to-end tests: a real ``bt.Dendrite`` streaming query."""

import time
from dataclasses import dataclass, field

import aiohttp
import bittensor as bt

from openai_miner.protocol import StreamPromptingSynapse


@dataclass
class Answer:
    chunks: list[str] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    synapse: StreamPromptingSynapse | None = None
    started: float = 0.0
    ended: float = 0.0

    @property
    def status(self) -> int | None:
        return self.synapse.dendrite.status_code if self.synapse else None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


async def ask(
    dendrite: bt.Dendrite,
    axon: bt.Axon,
    roles: list[str],
    messages: list[str],
    timeout: float = 10.0,
    task_name: str | None = None,
) -> Answer:
    answer = Answer(started=time.monotonic())
    synapse = StreamPromptingSynapse(roles=roles, messages=messages, task_name=task_name)
    responses = await dendrite.forward(
        axons=[axon.info()], synapse=synapse, timeout=timeout, deserialize=False, streaming=True
    )
    async for item in responses[0]:
        if isinstance(item, StreamPromptingSynapse):
            answer.synapse = item
        else:
            answer.chunks.append(item)
            answer.chunk_times.append(time.monotonic())
    answer.ended = time.monotonic()
    return answer


async def post_signed(
    session: aiohttp.ClientSession, dendrite: bt.Dendrite, axon: bt.Axon, messages: list[str], timeout: float = 30
) -> aiohttp.ClientResponse:
    """A validator's request sent by hand, so a test can hang up whenever it likes."""
    synapse = dendrite.preprocess_synapse_for_request(
        axon.info(), StreamPromptingSynapse(roles=["user"] * len(messages), messages=messages), timeout
    )
    return await session.post(
        f"http://127.0.0.1:{axon.port}/StreamPromptingSynapse",
        headers=synapse.to_headers(), json=synapse.model_dump(),
    )
