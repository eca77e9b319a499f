"""``python -m bench.memory``: where the default miner's memory goes with its local model on CPU.

The real ``openai-miner --mock`` process, a key set and a loopback upstream that answers HTTP 500,
so the local model (preloaded, ``--fallback.model`` or the default SmolLM2 GGUF) answers
``--questions`` validators (real dendrites) asking at once, in rounds (``--rounds``). Its
``/proc/PID/status`` is read:

- ``load``: once it serves (its summary line): VmRSS, and VmHWM, the peak while it started and loaded;
- ``answers``: after every round of answers: VmRSS and VmHWM (the peak so far).

Beside it, references in a child process each (``--reference``): the bare imports (torch,
transformers), and transformers alone loading the same model in the same dtype (float32 on CPU),
then answering one question with ``generate()``: what the weights cost without the miner around them.
Writes ``<out>/memory.json`` and ``<out>/memory.md``.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bittensor as bt

from bench.first_failure import add_miner_args, start_miner
from bench.record import Started, header, save
from bench.validators import Validators
from openai_miner.testing.localnet import axon_info
from openai_miner.testing.upstream import Fault, LoopbackUpstream

QUESTION = "Tell me a story about a river and the town beside it."


def status_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS (``rss``), VmHWM (``peak``), RssAnon (``anon``) and RssFile (``file``) in MB."""
    names = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in names:
            values[names[name]] = round(int(rest.split()[0]) / 1024)
    return values


def reference(model: str | None, stage: str) -> dict[str, Any]:
    """In this process: ``imports`` (torch, transformers) or ``transformers`` (load the model with
    transformers alone, float32 on CPU, and answer one question with ``generate()``)."""
    import torch
    import transformers

    out: dict[str, Any] = {"imports": status_mb()}
    if stage == "imports":
        return out
    from openai_miner.sources.local_model import default_model

    model = model or default_model()
    path = Path(model)
    kwargs: dict[str, Any] = {"local_files_only": True}
    source = model
    if path.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    out["load"] = status_mb()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        loaded.generate(**ids, max_new_tokens=128, do_sample=False)
    out["answers"] = status_mb()
    return out


def run_reference(model: str | None, stage: str) -> dict[str, Any]:
    import subprocess

    argv = [sys.executable, "-m", "bench.memory", "--reference", stage, *(["--model", model] if model else [])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"reference {stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def ask_round(axon: bt.AxonInfo, count: int, timeout: float) -> list[Any]:
    validators = Validators()
    try:
        return list(
            await asyncio.gather(*(validators.ask(i, axon, f"v{i}", timeout, message=QUESTION) for i in range(count)))
        )
    finally:
        await validators.close()


def run_miner(args: argparse.Namespace, upstream: LoopbackUpstream) -> dict[str, Any]:
    flags = [
        "--fallback.preload", "--fallback.failures", "1000000", "--openai.max_retries", "0",
        "--fallback.max_batch", str(args.max_batch), *args.flag,
    ]
    with tempfile.TemporaryDirectory(prefix="openai-miner-memory-") as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        with start_miner(workdir, upstream.base_url, args.model, flags, start_timeout=args.start_timeout) as miner:
            pid = miner.process.pid
            result: dict[str, Any] = {"ready_s": round(time.monotonic() - started, 1), "load": status_mb(pid)}
            wallet = bt.Wallet(name="miner", hotkey="default", path=str(workdir / "wallets"))
            axon = axon_info(miner.ports["axon"], wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
            rounds = []
            for _ in range(args.rounds):
                began = time.monotonic()
                answers = asyncio.run(ask_round(axon, args.questions, args.timeout))
                rounds.append({
                    "answered": sum(1 for a in answers if a.status == 200 and a.text.strip()),
                    "asked": len(answers),
                    "seconds": round(time.monotonic() - began, 1),
                    "distinct_answers": len({a.text for a in answers}),
                    "chars": [len(a.text) for a in answers],
                    "first": answers[0].text if answers else "",
                    **status_mb(pid),
                })
            result["rounds"] = rounds
        result["returncode"] = miner.returncode
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| process | RSS after load (MB) | RSS after answers (MB) | peak (MB) | answers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, ref in result["references"].items():
        after = ref.get("answers", ref.get("load", ref["imports"]))
        lines.append(
            f"| reference: {name} | {ref.get('load', ref['imports'])['rss']} | {after['rss']} | {after['peak']} | |"
        )
    miner = result["miner"]
    last = miner["rounds"][-1] if miner["rounds"] else miner["load"]
    answered = ", ".join(f"{r['answered']}/{r['asked']} in {r['seconds']:g} s" for r in miner["rounds"])
    flags = "".join(f" {flag}" for flag in result["flags"])
    lines.append(
        f"| openai-miner{flags} (max_batch {result['max_batch']}) | {miner['load']['rss']} "
        f"| {last['rss']} | {last['peak']} (load: {miner['load']['peak']}) | {answered} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    add_miner_args(parser)
    parser.add_argument("--questions", type=int, default=8, help="validators asking at once, each round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of questions")
    parser.add_argument("--timeout", type=float, default=60.0, help="each question's timeout (s)")
    parser.add_argument("--max-batch", type=int, default=32, help="--fallback.max_batch")
    parser.add_argument("--flag", action="append", default=[], help="one more miner flag (repeatable)")
    parser.add_argument("--no-reference", action="store_true", help="measure the miner only")
    parser.add_argument("--reference", choices=("imports", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = Started("bench.memory", sys.argv[1:] if argv is None else argv)
    if args.reference:  # the child of run_reference
        print(json.dumps(reference(args.model, args.reference)))
        return 0
    references = {} if args.no_reference else {
        stage: run_reference(args.model, stage) for stage in ("imports", "transformers")
    }
    with LoopbackUpstream(tokens=["never sent"]) as upstream:
        upstream.fault = Fault(status=500)
        miner = run_miner(args, upstream)
    result = {
        "meta": started.meta(),
        "model": args.model or "default",
        "questions": args.questions,
        "max_batch": args.max_batch,
        "flags": args.flag,
        "references": references,
        "miner": miner,
    }
    table = header(result["meta"]) + "\n\n" + markdown(result)
    print(json.dumps(miner, indent=1))
    save(args.out, "memory", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
