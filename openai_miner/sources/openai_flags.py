"""The upstream's flags, apart from its source: ``--help`` then needs neither the OpenAI SDK nor
LangChain, about a second of imports on a small machine."""

import argparse
from pathlib import Path

import bittensor as bt

from openai_miner.budget import STATE_FILE, DailyBudget
from openai_miner.config import advanced, at_least


def add_args(parser: argparse.ArgumentParser) -> None:
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
        default=1024, help="Most tokens in one answer: a request asking for more (max_tokens) gets this many.",
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
    advanced(parser.add_argument(
        "--openai.retry_backoff", type=at_least(0, float), default=0.25, metavar="SECONDS",
        help="Wait before the first retry; each next one waits about twice as long (at most 4 s), plus up to "
        "this much jitter, or as long as the upstream's Retry-After asks.",
    ))
    parser.add_argument(
        "--openai.daily_token_budget", type=at_least(0), default=0,
        help="Most upstream tokens (prompt + completion, as the upstream counts them) per UTC day; once spent, "
        "the local model answers (with --fallback.off, requests get 503) until 00:00 UTC. 0: no limit.",
    )
    parser.add_argument(
        "--neuron.state_dir", type=Path, default=None, metavar="DIR",
        help="Where the miner keeps what must survive a restart (the day's upstream spend); default: "
        "~/.bittensor/miners/WALLET/HOTKEY/netuidN/openai-miner.",
    )


def state_dir(config: bt.Config) -> Path:
    """``--neuron.state_dir``, or the wallet's miner directory as bittensor's miner template lays it out."""
    if config.neuron.state_dir is not None:
        return Path(config.neuron.state_dir).expanduser()
    wallet = config.wallet
    return Path("~/.bittensor/miners").expanduser() / wallet.name / wallet.hotkey / f"netuid{config.netuid}" / "openai-miner"


def daily_budget(config: bt.Config) -> DailyBudget | None:
    """The upstream's :class:`~openai_miner.budget.DailyBudget` (``None`` without a limit)."""
    limit = config.openai.daily_token_budget
    return DailyBudget(limit, state_dir(config) / STATE_FILE) if limit else None
