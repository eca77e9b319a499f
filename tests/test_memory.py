"""The local model's memory: the continuous batch's paged KV cache is reserved, not written.

transformers allocates the whole cache with ``torch.zeros`` (1.46 GB for SmolLM2-135M and 32
requests), which made it resident before any request: 2.5 GB for the default miner on CPU, 1.16 GB
since (``python -m bench.memory``). These tests read the residency of the cache's own mapping in
``/proc/self/smaps``, not the process's RSS: no threshold on anything else the process holds.
"""

import asyncio
import os
import struct
import sys
import time

import pytest
import torch

from openai_miner.messages import Message
from openai_miner.sources.local_batch import LAZY_ZEROS_BYTES, LazyZeros
from tests.helpers import DEVICE
from tests.helpers import local_source as source

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def written_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(written, all) pages of ``tensor``'s memory, from ``/proc/self/pagemap``: written pages are
    present and mapped by this process alone (bits 63 and 56); a page only read maps the shared
    zero page. Not the mapping's Rss in ``smaps``: the kernel merges neighbouring mappings."""
    start = tensor.data_ptr()
    first, last = start // PAGE, (start + tensor.numel() * tensor.element_size() - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    written = sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63 & 1 and entry >> 56 & 1)
    return written, last - first + 1


def test_lazy_zeros_are_zeros_resident_only_where_written() -> None:
    with LazyZeros():
        lazy = torch.zeros(64 << 20, dtype=torch.uint8, device="cpu")
        shaped = torch.zeros((1024, 1024), dtype=torch.float32)
        small = torch.zeros(16)
    assert lazy.shape == (64 << 20,) and lazy.dtype == torch.uint8
    assert shaped.shape == (1024, 1024) and shaped.dtype == torch.float32
    assert int(lazy.count_nonzero()) == 0 and int(shaped.count_nonzero()) == 0
    assert written_pages(lazy) == (0, (64 << 20) // PAGE), "64 MB of zeros written at once"
    lazy[: 10 * PAGE] = 1
    assert written_pages(lazy)[0] == 10
    assert int(lazy.sum()) == 10 * PAGE
    assert small.numel() * 4 < LAZY_ZEROS_BYTES and small.dtype == torch.float32  # small ones as usual
    eager = torch.zeros(64 << 20, dtype=torch.uint8)  # without the mode: torch writes every page
    assert written_pages(eager)[0] >= written_pages(eager)[1] - 1


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
    written, pages = written_pages(cache)
    assert pages * PAGE >= 16 << 20  # 32 requests of 1024 tokens reserved (2 layers of 32 floats a token)
    assert written < pages // 20, f"{written} of {pages} pages of an unused cache written"
    queue: asyncio.Queue = asyncio.Queue()
    await local.produce([Message("user", "what is the capital of france ?")], queue, time.monotonic() + 30)
    texts = []
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, str):
            texts.append(item)
    assert "".join(texts).strip()  # answered through the batch
    assert local._batch is not None and local._batch.manager is manager
    assert 0 < written_pages(cache)[0] < pages // 20  # one short request wrote a few pages of it
