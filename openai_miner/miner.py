"""``OpenAIMiner``: the base miner answering from an OpenAI-compatible chat model.

It wires the parts, in the order a request meets them: a front (:mod:`openai_miner.fronts`, served
by the base miner) asks the core (:mod:`openai_miner.core`), which streams the token source's answer
(:mod:`openai_miner.sources`) through the drain (:mod:`openai_miner.streaming`).

No ``from __future__ import annotations``: see :mod:`openai_miner.base`.
"""

import argparse

import bittensor as bt
from pydantic import SecretStr

from openai_miner import sources
from openai_miner.base import Miner
from openai_miner.config import LOCAL, UPSTREAM, group, layered_env
from openai_miner.core import Core
from openai_miner.fronts import axon
from openai_miner.fronts.axon import StreamingResponse
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.sources import openai_flags
from openai_miner.sources.base import TokenSource, closed
from openai_miner.system_prompts import load_system_prompts


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
        prompts = load_system_prompts(self.config.neuron.prompts_dir, self.config.neuron.system_prompt)
        key = api_key or layered_env().get("OPENAI_API_KEY") or None
        self.api_key = SecretStr(key) if key else None
        budget = None if source else openai_flags.daily_budget(self.config)
        self.core = Core.from_config(
            self.config,
            source or sources.build(self.config, self.api_key, budget),
            self.access,
            prompts,
            on_failure=self.request_exit,
            budget=budget,
        )

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        super().add_args(parser)
        openai_flags.add_args(group(parser, UPSTREAM))
        sources.add_args(group(parser, LOCAL))

    @property
    def source(self) -> TokenSource:
        return self.core.source

    def stop_run_thread(self, grace: float = 1.0) -> None:
        """Stop serving, then stop the token source's own threads (the local model's), so that none
        is still inside a native step when the interpreter exits (that aborted the process)."""
        super().stop_run_thread(grace)
        close = getattr(self.core.source, "close", None)
        if close is not None:
            close()

    def backend(self) -> str:
        """Which model answers, for the start-up summary (never the key)."""
        return self.core.source.describe()

    def can_answer(self) -> bool:
        """An upstream is configured (its failures fall back to the local model), or the local model
        is loaded: no answer would wait for a load; and the source is not closed (the upstream's
        daily budget spent with no local model)."""
        return bool(getattr(self.core.source, "loaded", True)) and closed(self.core.source) is None

    def forward(self, synapse: StreamPromptingSynapse) -> StreamingResponse:
        return axon.stream(self.core, synapse, self.gate.arrived(synapse))

    async def prompt(self, synapse: StreamPromptingSynapse) -> StreamPromptingSynapse:
        return await axon.whole(self.core, synapse)
