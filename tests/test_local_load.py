"""Issue 21 items 5 and 6, in process: the local model's CPU threads leave a core to the rest of the
machine, and closing the source stops every generation at its next step, in the batch or not, so
that the miner can stop before its process exits. Speed itself is measured by ``bench.local_load``.
"""

import asyncio
import time
from typing import Iterator

import pytest
import torch
from openai_miner.messages import Message

from openai_miner.miner import OpenAIMiner
from openai_miner.sources import local_source
from openai_miner.sources.base import Sampling, UpstreamError
from openai_miner.sources.fallback import CircuitBreaker, FallbackSource
from openai_miner.sources.local import LocalSource
from openai_miner.sources.local_model import LoadedModel, cpu_threads, load_model
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.localnet import miner_argv
from tests.helpers import local_source as started_source

QUESTION = [Message("user", "what is the capital of france ?")]


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Give the test process its torch threads back: loading a model on CPU sets them."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("requested", "cores", "threads"), [(0, 1, 1), (0, 2, 1), (0, 16, 15), (3, 2, 3)])
def test_by_default_the_model_leaves_one_core_to_the_rest(requested: int, cores: int, threads: int) -> None:
    assert cpu_threads(requested, cores) == threads


def test_the_model_computes_on_the_threads_asked_for(tiny_model: str, torch_threads: None) -> None:
    seen: list[int] = []

    def loader(model: str, device: str, dtype: str) -> LoadedModel:
        seen.append(torch.get_num_threads())  # set before the weights load and the batch starts
        return load_model(model, device, dtype)

    for threads in (1, 2):
        local = LocalSource(tiny_model, device="cpu", threads=threads, loader=loader)
        local.load()
        local.close()
    assert seen == [1, 2]


def test_the_threads_flag_reaches_the_local_source(tmp_path, tiny_model: str) -> None:
    config = OpenAIMiner.config(miner_argv(tmp_path, 8091, "--fallback.model", tiny_model, "--fallback.threads", "3"), env={})
    local = local_source(config, required=True)
    assert local is not None and local.threads == 3


async def first_token(local: LocalSource, sampling: Sampling) -> "asyncio.Task[None]":
    """A request that would generate for long, once it has streamed its first token."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(local.produce(QUESTION, queue, time.monotonic() + 600, sampling))
    await asyncio.wait_for(queue.get(), 60)
    return task


async def test_close_stops_the_batch_mid_request_and_waits_for_its_threads(tiny_model: str) -> None:
    local = started_source(tiny_model, max_new_tokens=100_000)
    task = await first_token(local, Sampling())
    batch = local._batch
    assert batch is not None and local.generating == 1
    await asyncio.to_thread(local.close)
    # The manager's own stop generates every request it holds to its end first: a hard stop does not.
    assert not batch.manager.is_running() and not batch.dispatcher.is_alive()
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(task, 10)


async def test_close_stops_plain_generations_and_waits_for_them(tiny_model: str) -> None:
    local = started_source(tiny_model, max_new_tokens=100_000)
    task = await first_token(local, Sampling(seed=1))  # a seed: the plain generate() path
    assert local._batch is not None and local._batch.holding() == 0 and local.generating == 1
    await asyncio.to_thread(local.close)
    assert local.generating == 0
    await asyncio.wait_for(task, 10)


class Closing(FakeSource):
    def __init__(self) -> None:
        super().__init__(["x"])
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_the_fallback_closes_its_local_source() -> None:
    local = Closing()
    FallbackSource(FakeSource(["y"]), local, CircuitBreaker(1, 1)).close()
    FallbackSource(FakeSource(["y"]), None, CircuitBreaker(1, 1)).close()  # nothing local to close
    assert local.closed == 1


def test_a_stopping_miner_closes_its_source(serve_miner) -> None:
    source = Closing()
    miner = serve_miner("--fallback.off", source=source)
    miner.stop_run_thread()
    assert source.closed == 1
