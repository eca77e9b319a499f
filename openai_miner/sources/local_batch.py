"""One continuous batch: transformers' manager, its per-request logits processors, and the one
thread that hands each request its text.

The manager's own background thread runs one forward step of every request in the batch at a
time; a request joins at the next step and leaves when it ends or is cancelled. Its outputs leave
through :class:`Batch`'s dispatcher thread, which decodes them and hands the text to each
request's event loop with ``call_soon_threadsafe``: nothing blocks the event loop.
"""

import asyncio
import itertools
import math
import mmap
import threading
from dataclasses import dataclass
from typing import Any, Callable

import bittensor as bt
import torch
from torch.overrides import TorchFunctionMode
from transformers import PreTrainedTokenizerBase

from openai_miner.sources.local_text import Decoder, penalize


def cb_classes() -> tuple[type, type]:
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
    )
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingLogitsProcessor, ContinuousBatchingConfig


LAZY_ZEROS_BYTES = 1 << 20
"""Smallest CPU ``torch.zeros`` that :class:`LazyZeros` hands out as untouched memory."""


class LazyZeros(TorchFunctionMode):
    """``torch.zeros`` on CPU, from ``LAZY_ZEROS_BYTES`` up, as fresh anonymous memory the kernel
    zero-fills page by page when first written: the same zeros, resident only where used.

    transformers allocates the paged KV cache of a continuous batch at once with ``torch.zeros``,
    which writes every byte: 1.46 GB resident for SmolLM2-135M's default cache (32 requests of
    1024 tokens, 45 KB a token in float32) before any request, 2.5 GB for the whole miner
    (measured, ``python -m bench.memory``). Its pages are now resident once a request writes them.
    Active only in the thread that enters it (torch's function modes are per thread).
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.zeros:
            lazy = _lazy_zeros(args, kwargs)
            if lazy is not None:
                return lazy
        return func(*args, **kwargs)


def _lazy_zeros(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``torch.zeros(*args, **kwargs)`` backed by a private anonymous mapping, or None where it is
    not a plain CPU allocation of at least ``LAZY_ZEROS_BYTES``."""
    if set(kwargs) - {"dtype", "device"}:
        return None  # out=, requires_grad=, layout=, pin_memory=...
    size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
    if not all(isinstance(n, int) for n in size):
        return None
    device = torch.device(kwargs.get("device") or "cpu")
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    if device.type != "cpu" or dtype.is_complex or dtype == torch.bool:
        return None
    nbytes = math.prod(size) * dtype.itemsize
    if nbytes < LAZY_ZEROS_BYTES:
        return None
    # The tensor keeps the mapping alive; it is unmapped with the last view of it.
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(tuple(size))


def lazy_cache(manager: Any) -> None:
    """Make ``manager`` (a ContinuousBatchingManager, not started) allocate its paged cache lazily
    (:class:`LazyZeros`): its thread creates the cache when it starts."""
    create = manager._create_batch_processor

    def create_lazily() -> Any:
        with LazyZeros():
            return create()

    manager._create_batch_processor = create_lazily


def batch_processors(penalty: float | None, exempt: frozenset[int] = frozenset()) -> list[Any]:
    """Two per-request logits processors for the batch: the repetition guard and greedy choice."""
    base, _ = cb_classes()

    class RepetitionPenalty(base):  # type: ignore[misc, valid-type]
        """transformers' repetition penalty for a batch: each row penalizes its own history.

        The history of each row is read from the requests when the step is prepared (on the
        manager's thread, just before the forward pass: no CUDA graphs, no async batching).
        """

        supported_kwargs: dict[str, type] = {}
        ignored_kwargs: tuple[str, ...] = ()

        def __init__(self) -> None:
            self.penalty = penalty
            self.histories: list[list[int]] = []

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            self.histories = [list(r.state.generated_tokens) for r in requests_with_new_token]
            return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            return penalize(scores, self.histories, self.penalty, exempt)

    class Greedy(base):  # type: ignore[misc, valid-type]
        """Leaves only the most likely token possible in rows that asked for temperature 0."""

        supported_kwargs: dict[str, type] = {"greedy": int}
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            flags = [r.state.logit_processor_kwargs.get("greedy", 0) for r in requests_with_new_token]
            return torch.tensor(flags, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            greedy = tensor_arg[: scores.shape[0]].bool()
            if not bool(greedy.any()):
                return scores
            best = torch.full_like(scores, -math.inf)
            best.scatter_(1, scores.argmax(-1, keepdim=True), 0.0)
            return torch.where(greedy[:, None], best, scores)

    return [RepetitionPenalty(), Greedy()]


@dataclass
class BatchRequest:
    """One request in the batch, as the dispatcher thread sees it."""

    decoder: Decoder
    loop: asyncio.AbstractEventLoop
    deliver: Callable[[list[str], bool, str | None], None]
    seen: int = 0


class Batch:
    """A running continuous-batching manager and the thread that routes its outputs."""

    def __init__(self, manager: Any, tokenizer: PreTrainedTokenizerBase) -> None:
        self.manager = manager
        self.tokenizer = tokenizer
        self.requests: dict[str, BatchRequest] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.closed = False
        self.dispatcher = threading.Thread(target=self._dispatch, name="local-batch-out", daemon=True)
        self.dispatcher.start()

    def alive(self) -> bool:
        return not self.closed and self.manager.is_running()

    def holding(self) -> int:
        """Requests the batch holds: queued for it, waiting in it, or generating."""
        manager = self.manager
        count = manager.input_queue.qsize()
        processor = manager.batch_processor
        if processor is not None:
            scheduler = processor.scheduler
            count += len(scheduler.active_requests) + len(scheduler.waiting_requests)
        return count

    def add(self, input_ids: list[int], request: BatchRequest, max_new_tokens: int, **kwargs: Any) -> str:
        request_id = f"local-{next(self.ids)}"
        with self.lock:
            self.requests[request_id] = request
        added = self.manager.add_request(
            input_ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True, **kwargs
        )
        if added is None:
            with self.lock:
                self.requests.pop(request_id, None)
            raise RuntimeError("the batch refused the request")
        return request_id

    def cancel(self, request_id: str) -> None:
        with self.lock:
            known = self.requests.pop(request_id, None) is not None
        if known:
            self.manager.cancel_request(request_id)

    def _dispatch(self) -> None:
        while not self.closed:
            output = self.manager.get_result(timeout=0.1)
            if output is None:
                if not self.manager.is_running():  # crashed: its requests' errors are already out
                    self._fail_all("the batch stopped")
                    return
                continue
            finished = output.is_finished()
            with self.lock:
                request = self.requests.get(output.request_id)
                if request is not None and finished:
                    del self.requests[output.request_id]
            if request is None:  # cancelled
                continue
            new = output.generated_tokens[request.seen :]
            request.seen = len(output.generated_tokens)
            texts = [text for text in map(request.decoder.push, new) if text]
            try:
                request.loop.call_soon_threadsafe(request.deliver, texts, finished, output.error)
            except RuntimeError:  # its loop is closed
                pass

    def _fail_all(self, error: str) -> None:
        with self.lock:
            requests, self.requests = list(self.requests.values()), {}
        for request in requests:
            try:
                request.loop.call_soon_threadsafe(request.deliver, [], True, error)
            except RuntimeError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop the manager after its current step and wait for its thread and the dispatcher to end.

        A hard stop: the manager's default stop first generates every request it holds to its end.
        """
        self.closed = True
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=timeout, hard_stop=True)
        if self.manager.is_running():
            bt.logging.warning(f"the local model's batch thread still runs {timeout:g}s after its stop")
        if self.dispatcher is not threading.current_thread():
            self.dispatcher.join(timeout)
        self._fail_all("the batch was stopped")
