"""The local model's memory: the continuous batch's paged KV cache is reserved, not written.

transformers allocates the whole cache with ``torch.zeros`` (1.46 GB for SmolLM2-135M and 32
requests), which made it resident before any request: 2.5 GB for the default miner on CPU, 1.16 GB
since (``python -m bench.memory``). These tests read the residency of the cache's own mapping in
``/proc/self/smaps``, not the process's RSS: no threshold on anything else the process holds.
"""

import asyncio
import sys
import time
from pathlib import Path

import pytest
import torch

from openai_miner.messages import Message
from openai_miner.sources.local_batch import LAZY_ZEROS_BYTES, LazyZeros
from tests.helpers import DEVICE
from tests.helpers import local_source as source

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

PAGE = 4096


def resident_kb(tensor: torch.Tensor) -> tuple[int, int]:
    """(size, resident) in kB of the mapping that holds ``tensor``'s first byte."""
    address = tensor.data_ptr()
    inside = False
    size = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
            size = (end - start) // 1024
        elif inside and first == "Rss:":
            return size, int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def test_lazy_zeros_are_zeros_resident_only_where_written() -> None:
    with LazyZeros():
        lazy = torch.zeros(64 << 20, dtype=torch.uint8, device="cpu")
        shaped = torch.zeros((1024, 1024), dtype=torch.float32)
        small = torch.zeros(16)
    assert lazy.shape == (64 << 20,) and lazy.dtype == torch.uint8
    assert shaped.shape == (1024, 1024) and shaped.dtype == torch.float32
    assert int(lazy.count_nonzero()) == 0 and int(shaped.count_nonzero()) == 0  # read: still not resident
    size, resident = resident_kb(lazy)
    assert size >= 64 << 10 and resident <= 64, "64 MB of zeros written at once"
    lazy[: 10 * PAGE] = 1
    assert resident_kb(lazy)[1] >= 10 * PAGE // 1024
    assert int(lazy.sum()) == 10 * PAGE
    assert small.numel() * 4 < LAZY_ZEROS_BYTES and small.dtype == torch.float32  # small ones as usual


def test_lazy_zeros_leave_other_allocations_alone() -> None:
    with LazyZeros():
        grad = torch.zeros(1 << 20, requires_grad=True)
        ones = torch.ones(1 << 20)
    assert grad.requires_grad and int(ones.sum()) == 1 << 20


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU cache's residency")
async def test_the_batch_cache_is_resident_only_where_requests_wrote(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=8, max_batch=32)
    manager = local._batch.manager
    started = time.monotonic()
    while manager.batch_processor is None and time.monotonic() - started < 30:
        await asyncio.sleep(0.05)
    cache = manager.batch_processor.cache.cache_tensor
    size, resident = resident_kb(cache)
    assert size >= cache.numel() // 1024 > 1024  # 32 requests of 1024 tokens reserved
    assert resident < size // 20, f"{resident} of {size} kB of an unused cache resident"
    queue: asyncio.Queue = asyncio.Queue()
    await local.produce([Message("user", "what is the capital of france ?")], queue, time.monotonic() + 30)
    texts = []
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, str):
            texts.append(item)
    assert "".join(texts).strip()  # answered through the batch
    assert local._batch is not None and local._batch.manager is manager
    assert resident_kb(cache)[1] < size // 20  # one short request wrote a few pages of it
