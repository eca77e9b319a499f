"""``OpenAIMiner``: the base miner answering from an OpenAI-compatible chat model.

The data path, in the order of this package's modules: the synapse (``protocol``) becomes chat
messages (``messages``), a token source (``sources``) fills a queue, and the drain
(``streaming``) sends it in batches to the validator.

No ``from __future__ import annotations``: see :mod:`openai_miner.neuron`.
"""

import argparse
import time
from typing import MutableMapping

import bittensor as bt
from pydantic import SecretStr

from openai_miner.config import layered_env
from openai_miner.messages import InvalidPrompt, to_chat_messages
from openai_miner.neuron import Miner, StreamingResponse, refuse
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.sources.base import TokenSource
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.streaming import Send, StreamResult, stream_answer, stream_deadline


class OpenAIMiner(Miner):
    """Subnet-1 miner streaming answers from OpenAI or any OpenAI-compatible server."""

    def __init__(
        self,
        config: bt.Config | None = None,
        api_key: str | None = None,
        *,
        source: TokenSource | None = None,
        wallet: bt.Wallet | None = None,
        subtensor: bt.Subtensor | None = None,
        axon: bt.Axon | None = None,
    ) -> None:
        super().__init__(config, wallet=wallet, subtensor=subtensor, axon=axon)
        key = api_key or layered_env().get("OPENAI_API_KEY") or None
        self._api_key = SecretStr(key) if key else None
        self.source: TokenSource = source or self.openai_source()

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        super().add_args(parser)
        parser.add_argument(
            "--openai.model_name", "--neuron.model_id", dest="openai.model_name", type=str,
            default="gpt-4o-mini", help="Chat model name, as the server knows it.",
        )
        parser.add_argument(
            "--openai.temperature", "--neuron.temperature", dest="openai.temperature", type=float,
            default=0.7, help="Sampling temperature.",
        )
        parser.add_argument(
            "--openai.max_tokens", "--neuron.max_tokens", dest="openai.max_tokens", type=int,
            default=1024, help="Most tokens in one answer.",
        )
        parser.add_argument(
            "--openai.base_url", type=str, default=None,
            help="OpenAI-compatible server (vLLM, a proxy); default: OpenAI's API.",
        )
        parser.add_argument(
            "--openai.timeout", type=float, default=30.0, help="Seconds for one upstream request."
        )
        parser.add_argument(
            "--openai.max_retries", type=int, default=2,
            help="Retries of a transient upstream error before the first token, within the deadline.",
        )

    def openai_source(self) -> OpenAISource:
        settings = self.config.openai
        if self._api_key is None and not settings.base_url:
            bt.logging.error("OPENAI_API_KEY is not set: requests to OpenAI will fail")
        model = chat_openai(
            model=settings.model_name,
            api_key=self._api_key,
            base_url=settings.base_url,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            timeout=settings.timeout,
        )
        return OpenAISource(model, max_retries=settings.max_retries)

    def chat_messages(self, synapse: StreamPromptingSynapse) -> list:
        try:
            return to_chat_messages(
                synapse.roles,
                synapse.messages,
                system_prompt=self.config.neuron.system_prompt,
                max_chars=self.config.neuron.max_prompt_chars,
            )
        except InvalidPrompt as invalid:
            bt.logging.info(f"refused a malformed synapse: {invalid}")
            raise refuse(synapse, 400, f"invalid prompt: {invalid}") from invalid

    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        messages = self.chat_messages(synapse)
        deadline = stream_deadline(
            synapse.timeout, now=time.monotonic(), margin=self.config.neuron.deadline_margin
        )
        hotkey = synapse.dendrite.hotkey if synapse.dendrite else None

        async def token_streamer(send: Send) -> None:
            result = await stream_answer(
                self.source, messages, send,
                batch_size=self.config.neuron.streaming_batch_size, deadline=deadline,
            )
            self.report(result, hotkey)

        return synapse.create_streaming_response(token_streamer)

    async def prompt(self, synapse: StreamPromptingSynapse) -> StreamPromptingSynapse:
        messages = self.chat_messages(synapse)
        deadline = stream_deadline(
            synapse.timeout, now=time.monotonic(), margin=self.config.neuron.deadline_margin
        )
        parts: list[bytes] = []

        async def collect(message: MutableMapping[str, object]) -> None:
            parts.append(message["body"])  # type: ignore[arg-type]

        result = await stream_answer(
            self.source, messages, collect,
            batch_size=self.config.neuron.streaming_batch_size, deadline=deadline,
        )
        self.report(result, None)
        synapse.completion = b"".join(parts).decode("utf-8")
        return synapse

    def report(self, result: StreamResult, hotkey: str | None) -> None:
        """One log line per answer; an error is a warning, and may stop the miner if configured."""
        who = hotkey[:10] if hotkey else "local"
        line = f"{who}: {result.tokens} tokens in {result.sends} chunks via {self.source.name} ({result.outcome})"
        if result.outcome != "error":
            bt.logging.debug(line)
            return
        when = "before the first token" if result.tokens == 0 else "mid-stream"
        bt.logging.warning(f"{line}: upstream failed {when}: {result.error}")
        if self.config.neuron.stop_on_forward_exception:
            bt.logging.error("stopping: --neuron.stop_on_forward_exception is set")
            self.request_exit()
