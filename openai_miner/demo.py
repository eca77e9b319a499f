"""``openai-miner demo "prompt"``: one miner and its validators on this machine, one real question.

Everything a validator on subnet 1 would see, with nothing to set up: throwaway wallets (a
temporary directory, or ``--wallet-dir``), the miner in ``--mock`` mode in this process with its
axon on 127.0.0.1, the validators registered on the mock chain with a permit and stake, and a real
``bt.Dendrite`` from each validator's wallet asking ``StreamPromptingSynapse(roles=["user"],
messages=[prompt])``. The answer is printed as it streams, then a summary: chunks, time to the
first chunk, total time, status code and which backend answered.

``--front loosh`` asks as an SN78 (Loosh inference subnet) validator instead: the miner serves only
its SN78 front, and each validator handshakes (RSA-OAEP key exchange, sr25519-signed) and sends
the prompt as an encrypted challenge; the decrypted answer is printed whole (SN78 does not stream).

The miner picks its backend as in production: OpenAI when ``OPENAI_API_KEY`` is set (or the
server of ``--base-url``, which needs no key), the local fallback model otherwise.

Exit codes: 0 every validator got a streamed answer, 1 one did not (the reason is printed),
2 bad configuration (flag, variable or ``.env``), 3/4/5/6 as ``openai-miner``, 130 interrupted.
Whatever happens, the axon is stopped and its port released before returning.
"""

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Mapping, Sequence, TextIO

import bittensor as bt
import httpx

from openai_miner.cli import INTERRUPTED, exit_code
from openai_miner.config import ConfigError, at_least, layered_env, port_number
from openai_miner.miner import OpenAIMiner
from openai_miner.sources import descriptions
from openai_miner.startup import StartupError
from openai_miner.chain import mock_subtensor
from openai_miner.testing.localnet import (
    NETUID,
    free_port,
    make_wallet,
    miner_argv,
    offline_ip,
    register_validator,
)
from openai_miner.testing.loosh import LooshValidator
from openai_miner.testing.validator import Answer, ask

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-miner demo",
        description=(
            "Start a throwaway miner (mock chain, axon on 127.0.0.1) and ask it PROMPT from a "
            "registered validator with a real bittensor Dendrite, printing the answer as it streams. "
            "Answers from OpenAI when OPENAI_API_KEY is set or --base-url is given, from the local "
            "fallback model otherwise."
        ),
        epilog='Example: openai-miner demo "Name three rivers in Europe." --concurrency 4',
    )
    parser.add_argument(
        "prompt", nargs="?", default=DEFAULT_PROMPT, help="What the validator asks (default: %(default)r)."
    )
    parser.add_argument(
        "--base-url", default=None,
        help="OpenAI-compatible server (vLLM, Ollama, a proxy); no key needed. "
        "Default: OPENAI_BASE_URL, else OpenAI's API when OPENAI_API_KEY is set.",
    )
    parser.add_argument("--model", default=None, help="Chat model name on that server (default: gpt-4o-mini).")
    parser.add_argument(
        "--local-model", default=None,
        help="Local fallback model: Hugging Face id, directory or .gguf file (default: SmolLM2-135M-Instruct).",
    )
    parser.add_argument("--no-fallback", action="store_true", help="Never answer from the local model.")
    parser.add_argument(
        "--batch-size", type=at_least(1), default=12, help="Tokens per streamed chunk (default: %(default)s)."
    )
    parser.add_argument(
        "--timeout", type=at_least(0, float, inclusive=False), default=60.0,
        help="The validator's timeout in seconds, for the whole stream (default: %(default)g; CPU is slow).",
    )
    parser.add_argument(
        "--concurrency", type=at_least(1), default=1,
        help="Validators asking at once, each with its own wallet; above 1, each answer is printed whole when it ends "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--max-tokens", type=at_least(1), default=None,
        help="Most tokens in the answer, upstream and local (default: the miner's, 1024 upstream and 128 local).",
    )
    parser.add_argument(
        "--wallet-dir", default=None,
        help="Keep the demo wallets here (created if missing) instead of a temporary directory.",
    )
    parser.add_argument(
        "--front", choices=("axon", "loosh"), default="axon",
        help="How the validators ask: axon (SN1's synapse, streamed) or loosh (SN78's handshake and "
        "encrypted challenge, answered whole) (default: %(default)s).",
    )
    parser.add_argument(
        "--port", type=port_number, default=0, help="Port of the front asked (default: 0, any free port)."
    )
    parser.add_argument("--verbose", action="store_true", help="Bittensor and miner debug logging.")
    return parser


def problem(answer: Answer, timeout: float) -> str:
    """Why a validator got no answer, and what to try; empty when it got one."""
    if answer.ok:
        return ""
    if answer.error:
        return answer.error
    if answer.status == 408:
        got = f"{len(answer.chunks)} chunks arrived" if answer.chunks else "nothing arrived"
        return f"timed out after {timeout:g}s ({got}): raise --timeout or lower --max-tokens"
    if answer.status == 200:
        return "the miner answered with nothing (did its upstream fail? --verbose shows the miner's log)"
    return f"status {answer.status}: {answer.message or 'no message'}"


def demo_flags(args: argparse.Namespace) -> list[str]:
    """The miner's flags for the demo's choices, plus fixed ones so stray variables cannot break it."""
    flags = [
        "--neuron.streaming_batch_size", str(args.batch_size),
        "--neuron.prompt_cache_seconds", "0",  # the validators all ask the same thing
        "--blacklist.allow_non_registered", "false", "--blacklist.force_validator_permit", "true",
        "--blacklist.min_stake", "0",
    ]
    if args.base_url:
        flags += ["--openai.base_url", args.base_url]
    if args.model:
        flags += ["--openai.model_name", args.model]
    if args.local_model:
        flags += ["--fallback.model", args.local_model]
    if args.max_tokens:
        flags += ["--openai.max_tokens", str(args.max_tokens), "--fallback.max_new_tokens", str(args.max_tokens)]
    if args.no_fallback:
        flags += ["--fallback.off"]
    if args.verbose:
        flags += ["--logging.debug"]
    if args.front == "loosh":
        flags += ["--loosh.timeout", str(args.timeout)]
    return flags


def sn78_challenge(prompt: str, max_tokens: int | None) -> dict[str, object]:
    """The prompt as SN78's validator sends it (``prompt`` alone is one user message)."""
    challenge: dict[str, object] = {
        "prompt": prompt,
        "model": "default",  # the validator's name for its default model: a hint the miner does not route on
        "correlation_id": str(uuid.uuid4()),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if max_tokens:
        challenge["max_tokens"] = max_tokens
    return challenge


async def ask_sn78(wallet: bt.Wallet, port: int, prompt: str, max_tokens: int | None, timeout: float) -> Answer:
    """One SN78 validator's round: handshake, encrypted challenge, decrypted answer, as an :class:`Answer`."""
    answer = Answer(started=time.monotonic())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout + 5) as client:
        reply = await LooshValidator(wallet.hotkey, client).ask(sn78_challenge(prompt, max_tokens))
    answer.ended = time.monotonic()
    answer.status, answer.error = reply.status, reply.error
    text = (reply.answer or {}).get("response_text")
    if isinstance(text, str) and text:
        answer.chunks, answer.chunk_times = [text], [answer.ended]
    return answer


async def ask_all_sn78(
    validators: Sequence[bt.Wallet], port: int, args: argparse.Namespace, out: TextIO
) -> list[Answer]:
    """Every validator's SN78 round at once; each answer printed whole as it ends."""

    async def one(index: int, wallet: bt.Wallet) -> Answer:
        answer = await ask_sn78(wallet, port, args.prompt, args.max_tokens, args.timeout)
        if len(validators) > 1:
            print(numbered_answer(index, answer, len(validators)), file=out, flush=True)
        else:
            print(answer.text, file=out, flush=True)
        return answer

    return list(await asyncio.gather(*(one(i, w) for i, w in enumerate(validators))))


def answered_by(finished: Counter[str], tried: Counter[str], described: Mapping[str, str], backend: str) -> str:
    """Which sources finished answers (``finished``, by source name), in words; else which were cut
    short or failed (``tried``); else the whole backend, said unknown."""
    if finished:
        if len(finished) == 1 and finished.total() == 1:
            return described.get(next(iter(finished)), backend)
        return ", ".join(f"{described.get(name, name)} x{count}" for name, count in finished.most_common())
    if tried:  # cut at the deadline or failed: no source finished an answer
        return f"{', '.join(described.get(name, name) for name in tried)}, unfinished"
    return f"unknown: no answer finished ({backend})"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def summary_line(answer: Answer) -> str:
    return (
        f"chunks {len(answer.chunks)} | first chunk {_seconds(answer.first_chunk)} | "
        f"total {_seconds(answer.total)} | status {answer.status}"
    )


def numbered_answer(index: int, answer: Answer, count: int) -> str:
    """One validator's summary line, then its whole answer, indented."""
    width = len(str(count))
    text = "\n".join(f"    {line}" for line in answer.text.strip().splitlines()) or "    (nothing)"
    return f"[{index + 1:>{width}}/{count}] {summary_line(answer)}\n{text}"


async def ask_all(
    validators: Sequence[bt.Wallet], axon: bt.AxonInfo, prompt: str, timeout: float, out: TextIO
) -> list[Answer]:
    async def one(index: int, wallet: bt.Wallet) -> Answer:
        async with bt.Dendrite(wallet=wallet) as dendrite:
            if len(validators) > 1:
                answer = await ask(dendrite, axon, ["user"], [prompt], timeout, label=str(index))
                print(numbered_answer(index, answer, len(validators)), file=out, flush=True)
                return answer

            def show(chunk: str) -> None:
                out.write(chunk)
                out.flush()

            answer = await ask(dendrite, axon, ["user"], [prompt], timeout, on_chunk=show)
            out.write("\n")
            out.flush()
            return answer

    return list(await asyncio.gather(*(one(i, w) for i, w in enumerate(validators))))


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The demo; returns its exit code. Never leaves the axon running."""
    out = out or sys.stdout
    err = err or sys.stderr
    with contextlib.ExitStack() as stack:
        stack.enter_context(offline_ip())  # bittensor would ask the internet for this machine's IP
        miner: OpenAIMiner | None = None
        try:
            if args.wallet_dir:
                wallet_dir = os.path.abspath(os.path.expanduser(args.wallet_dir))
            else:
                wallet_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="openai-miner-demo-"))
            env = layered_env()
            port = args.port or free_port()
            if args.front == "loosh":  # the SN78 front alone, on the port asked
                argv = miner_argv(
                    wallet_dir, free_port(), "--axon.off", "--loosh.port", str(port), *demo_flags(args),
                    name="demo-miner",
                )
            else:
                argv = miner_argv(wallet_dir, port, *demo_flags(args), name="demo-miner")
            config = OpenAIMiner.config(argv, env=env)
            make_wallet(wallet_dir, "demo-miner")  # its own throwaway directory: nothing to announce
            validators = [make_wallet(wallet_dir, f"demo-validator-{i}") for i in range(args.concurrency)]
            chain = mock_subtensor(NETUID)
            for wallet in validators:
                register_validator(chain, wallet)
            local_first = not env.get("OPENAI_API_KEY") and not config.openai.base_url
            preloading = not config.fallback.off and (local_first or config.fallback.preload)
            if preloading:
                print(
                    "no OPENAI_API_KEY: loading local model… (CPU: about 20 s)" if local_first
                    else "loading the local fallback model… (CPU: about 20 s; --no-fallback skips it)",
                    file=out, flush=True,
                )
            loading = time.monotonic()
            miner = OpenAIMiner(config, subtensor=chain)
            if preloading:
                print(f"loaded in {time.monotonic() - loading:.1f}s", file=out, flush=True)
            miner.run_in_background_thread()
            print(
                f"miner {miner.wallet.hotkey.ss58_address} on 127.0.0.1:{port} ({args.front} front, mock chain) | "
                f"backend {miner.backend()} | batch {config.neuron.streaming_batch_size} tokens",
                file=out, flush=True,
            )
            who = (
                f"validator {validators[0].hotkey.ss58_address}"
                if len(validators) == 1 else f"{len(validators)} validators"
            )
            how = " as SN78 validators do (a handshake, then an encrypted challenge)" if args.front == "loosh" else ""
            print(f"{who} ask{how} (timeout {args.timeout:g}s): {args.prompt}", file=out, flush=True)
            print("", file=out, flush=True)
            stats = miner.core.stats
            finished, tried = stats.by_source("complete"), stats.by_source()
            started = time.monotonic()
            if args.front == "loosh":
                answers = asyncio.run(ask_all_sn78(validators, port, args, out))
            else:
                answers = asyncio.run(ask_all(validators, miner.axon.info(), args.prompt, args.timeout, out))
            wall = time.monotonic() - started
            backend = answered_by(
                stats.by_source("complete") - finished, stats.by_source() - tried,
                descriptions(miner.source), miner.backend(),
            )
            print("---", file=out)
            if len(answers) == 1:
                print(f"{summary_line(answers[0])} | backend {backend}", file=out, flush=True)
            else:
                good = sum(answer.ok for answer in answers)
                print(
                    f"{good}/{len(answers)} answered | wall time {wall:.2f}s | backend {backend}",
                    file=out, flush=True,
                )
            failed = [answer for answer in answers if not answer.ok]
            for index, answer in enumerate(answers):
                if not answer.ok:
                    print(
                        f"openai-miner demo: validator {index + 1} got no answer: {problem(answer, args.timeout)}",
                        file=err, flush=True,
                    )
            late = [a for a in answers if a.ok and a.total >= args.timeout - 1.0]
            if late:
                print(
                    f"note: {len(late)} answer(s) ended near the {args.timeout:g}s timeout, probably cut "
                    "short: raise --timeout or lower --max-tokens",
                    file=err, flush=True,
                )
            return 1 if failed else 0
        except (KeyboardInterrupt, ConfigError, StartupError) as error:
            code, message = exit_code(error)
            newline = "\n" if code == INTERRUPTED else ""  # after ^C on the terminal
            print(f"{newline}openai-miner demo: {message}", file=err, flush=True)
            return code
        finally:
            if miner is not None:
                miner.stop_run_thread()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
