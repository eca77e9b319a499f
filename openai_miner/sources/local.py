"""A token source that runs a causal language model on this machine with transformers.

Loading takes seconds to minutes, so it happens once: at start-up (:meth:`LocalSource.load`), or
in a background thread started by the first request that needs the model, which every request
needing it meanwhile waits for, each within its own deadline.

**Batched generation.** Requests share one running batch: transformers' continuous batching
(``model.init_continuous_batching()``, a :class:`ContinuousBatchingManager` whose own background
thread runs one forward step of every request in the batch at a time). A request joins at the next
step (``add_request``), leaves when it ends, or at the next step once cancelled (``cancel_request``:
at its deadline, on hang-up, or at a stop string), so an abandoned request stops using the CPU/GPU.
Each request keeps its own ``max_tokens``, temperature, top-p, top-k and stream: per-request logits
processors. ``max_batch`` caps the requests using the model at once (others wait, each within its
deadline); ``max_batch=1`` answers one request at a time. Outputs leave the manager's queue through
one dispatcher thread that decodes them and hands the text to each request's asyncio queue with
``call_soon_threadsafe``: nothing blocks the event loop.

**The plain path.** A request goes to a plain ``generate()`` call in this source's own threads
(still at most ``max_batch`` requests in all) where continuous batching cannot serve it:

- ``seed`` set: the batch samples every request from one shared random generator, so a request's
  seed cannot make its own answer reproducible; the plain path samples with a generator of its own.
- ``top_logprobs`` set: the manager returns only the chosen token's log-probability (of the
  temperature-scaled distribution), never the alternatives.
- the model cannot batch: no ``init_continuous_batching`` (not a transformers generative model), an
  attention implementation other than SDPA or flash (the manager would switch the shared model to
  ``paged|eager``, under plain-path requests), or a manager that failed to start or crashed (logged;
  the next request tries a fresh one).

**Repetition guard.** Small models loop. Both paths apply a repetition penalty (the model's own
``generation_config.repetition_penalty`` if it sets one, else ``repetition_penalty``) to the tokens
of the answer so far, never to the prompt's and never to the end-of-turn tokens: penalizing the
prompt's end-of-turn markers kept the model from ever stopping. Transformers' own processor does
not run in a batch and covers the prompt, so both paths use :func:`penalize`.

A prompt over the model's context keeps its most recent tokens: past its trained positions a model
answers nonsense, or fails outright.

**Tools and usage.** A request's ``tools`` go into the prompt through the chat template when the
template takes them (it names ``tools``), with the conversation's tool calls and results; the
model's answer stays text (no tool call is parsed out of it). A template without tool support
gets the conversation as text: tool results as user messages, the tools left out. Each complete
answer ends with a :class:`~openai_miner.sources.base.Finish`: the prompt's and the answer's token
counts (every token generated, stop string or not), ``length`` when it reached its token limit.

**Under load.** On CPU the model computes on one thread fewer than the cores (``threads``): with
every core in a step, one core taken by another process stalled each step at the threads'
barriers, and a stalled upstream left most validators unanswered. :meth:`LocalSource.close` stops
every generation at its next step and waits for its thread: the miner calls it as it stops, since
a thread torn down mid-step at exit aborts the process.

The pieces: loading in :mod:`~openai_miner.sources.local_model`, the running batch in
:mod:`~openai_miner.sources.local_batch`, and what both paths do token by token (decoding, stop
strings, the repetition guard) in :mod:`~openai_miner.sources.local_text`.
"""

import asyncio
import copy
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import bittensor as bt
import jinja2
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from openai_miner.messages import Message
from openai_miner.sources.base import DEFAULT_SAMPLING, Finish, Item, Sampling, Token, UpstreamError, Usage
from openai_miner.sources.local_batch import Batch, BatchRequest, batch_processors, cb_classes, lazy_cache
from openai_miner.sources.local_model import (
    LoadedModel,
    adopt_threads,
    cpu_threads,
    load_model,
    pick_device,
    pick_dtype,
)
from openai_miner.sources.local_text import Decoder, StopStrings, exempt, penalize

# Default repetition penalty for models whose generation config sets none.
REPETITION_PENALTY = 1.2
# Default most new tokens: SmolLM2-135M (float32) on a 2-core CPU makes about 23 tokens/s alone,
# 67 in all (8 per request) in a batch of 8 and 83 (5 per request) in a batch of 16: 128 tokens
# finish in about 6 s alone and about 15 s in a batch of 8, inside a 12-20 s deadline.
MAX_NEW_TOKENS = 128
# Tokens of KV cache per request the batch reserves room for (a single request may use the whole
# context); the cache is reserved, not written (local_batch.LazyZeros): on CPU only what requests
# write is resident (SmolLM2-135M, float32: 45 KB a token, 1.46 GB reserved for 32 requests).
CACHE_TOKENS_PER_REQUEST = 1024
# Most prompt tokens in one forward step: a long prompt is prefilled over several steps, so requests
# already decoding keep streaming meanwhile.
STEP_TOKENS = {"cpu": 256, "cuda": 2048}


# --------------------------------------------------------------------------------------------------
# The plain generate() path


class _StopWhen(StoppingCriteria):
    """Ends generation once the request is abandoned, its deadline has passed or a stop string came."""

    def __init__(self, stop: threading.Event, deadline: float, stops: "StopStrings") -> None:
        self.stop = stop
        self.deadline = deadline
        self.stops = stops

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.stop.is_set() or self.stops.stopped or time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Pick(LogitsProcessor):
    """The last processor of a plain ``generate()``: picks the token itself and reports it.

    It samples (temperature, top-k, top-p) with its own generator, so a seed makes the answer
    reproducible whatever else runs, or takes the most likely token at temperature 0, then leaves
    only that token possible for ``generate()``'s greedy choice. Log-probabilities are those of the
    scores it receives: the model's, after the repetition guard, before temperature.
    """

    def __init__(
        self,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        top_logprobs: int | None,
        on_token: Callable[[int, float, list[tuple[int, float]]], None],
    ) -> None:
        self.temperature = temperature
        self.warpers: list[LogitsProcessor] = []
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.top_logprobs = top_logprobs
        self.on_token = on_token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.temperature > 0:
            warped = scores / self.temperature
            for warper in self.warpers:
                warped = warper(input_ids, warped)
            if self.generator is None:
                self.generator = torch.Generator(device=scores.device)
                if self.seed is None:
                    self.generator.seed()
                else:
                    self.generator.manual_seed(self.seed)
            chosen = torch.multinomial(warped.softmax(-1), 1, generator=self.generator)[:, 0]
        else:
            chosen = scores.argmax(-1)
        if self.top_logprobs is not None:
            logprobs = scores[0].log_softmax(-1)
            best = logprobs.topk(self.top_logprobs) if self.top_logprobs else None
            top = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
            self.on_token(int(chosen[0]), float(logprobs[chosen[0]]), top)
        else:
            self.on_token(int(chosen[0]), 0.0, [])
        picked = torch.full_like(scores, -math.inf)
        picked.scatter_(1, chosen[:, None], 0.0)
        return picked


class _AnswerPenalty(LogitsProcessor):
    """The repetition guard of the plain path: the answer's tokens only (after ``prompt`` tokens)."""

    def __init__(self, prompt: int, penalty: float | None, exempt: frozenset[int]) -> None:
        self.prompt, self.penalty, self.exempt = prompt, penalty, exempt

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return penalize(scores, input_ids[:, self.prompt :].tolist(), self.penalty, self.exempt)


# --------------------------------------------------------------------------------------------------


def _release_soon(loop: asyncio.AbstractEventLoop, semaphore: asyncio.Semaphore) -> None:
    try:
        loop.call_soon_threadsafe(semaphore.release)
    except RuntimeError:  # the loop is closed, and its semaphore with it
        pass


@dataclass(frozen=True)
class _Plan:
    """One request's resolved settings."""

    temperature: float
    top_p: float | None
    top_k: int | None
    max_new_tokens: int
    seed: int | None
    stop: tuple[str, ...]
    top_logprobs: int | None
    tools: tuple[dict[str, Any], ...] = ()  # given to the chat template; empty when it takes none
    extra: dict = field(default_factory=dict)


class LocalSource:
    """Answers with a local transformers model, loaded at start (:meth:`load`) or on first use.

    ``max_batch`` caps the requests generating at once, in one continuous batch (others wait for a
    place, each within its deadline). ``dtype`` is ``auto`` (bfloat16 on CUDA, float16 where the GPU
    lacks it, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``. ``repetition_penalty`` is
    used for models whose generation config sets none (1.0: none). ``batching=False`` sends every
    request to the plain ``generate()`` path. ``threads`` is how many threads a CPU step uses (0:
    one fewer than the cores, see :func:`cpu_threads`). ``loader`` turns (model, device, dtype)
    into a :class:`LoadedModel`; tests pass a slow one.
    """

    name = "local"

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        max_batch: int = 32,
        temperature: float = 0.0,
        dtype: str = "auto",
        repetition_penalty: float = REPETITION_PENALTY,
        batching: bool = True,
        threads: int = 0,
        executor: ThreadPoolExecutor | None = None,
        loader: Callable[[str, str, str], LoadedModel] = load_model,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, not {repetition_penalty}")
        self.model = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self._dtype_name = dtype
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty
        self.batching = batching
        self.threads = threads
        self._executor = executor or ThreadPoolExecutor(
            max_workers=max_batch, thread_name_prefix="local-generate"
        )
        self._loader = loader
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._loading: Future[LoadedModel] | None = None
        self._loading_lock = threading.Lock()
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._plain = 0
        self._plain_jobs: dict[Future[None], threading.Event] = {}
        self._batch: Batch | None = None
        self._batch_lock = threading.Lock()
        self._batch_unavailable: str | None = None

    # ---------------------------------------------------------------------------------------------

    @property
    def generating(self) -> int:
        """Requests using the model now: plain generate() calls running, abandoned ones included,
        and requests the batch holds (a cancelled one until the batch has dropped it)."""
        batch = self._batch
        return self._plain + (batch.holding() if batch is not None else 0)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the batch (``max_batch`` are generating)."""
        return self._waiting

    @property
    def loaded(self) -> bool:
        """Whether a request can generate at once, without waiting for the model to load."""
        return self._loaded is not None

    def describe(self) -> str:
        dtype = str(self._loaded.model.dtype if self._loaded else self.dtype).removeprefix("torch.")
        return f"local ({Path(self.model).name} on {self.device}, {dtype})"

    def load(self) -> LoadedModel:
        """Load the model once (blocking) and start its batch; later calls return the same one."""
        with self._load_lock:
            if self._loaded is None:
                if self.device == "cpu":
                    self._use_cpu_threads()
                loaded = self._loader(self.model, self.device, self._dtype_name)
                if self.batching and _cannot_batch(loaded.model) is None:
                    self._start_batch(loaded)  # its cache is allocated now, not by the first request
                self._loaded = loaded
            return self._loaded

    def _use_cpu_threads(self) -> None:
        threads = cpu_threads(self.threads)
        torch.set_num_threads(threads)  # the whole process's: every thread started from now on
        bt.logging.info(f"the local model computes on {threads} CPU thread(s) (--fallback.threads)")

    def close(self, timeout: float = 10.0) -> None:
        """Stop generating, and return once no thread of this source computes any more.

        The miner calls it before it exits: a generating thread still in a native step when the
        interpreter tears it down aborts the process (``terminate called without an active
        exception``). A later request starts a fresh batch.
        """
        with self._batch_lock:
            batch, self._batch = self._batch, None
        if batch is not None:
            batch.close(timeout)
        with self._count_lock:
            jobs = dict(self._plain_jobs)
        for stop in jobs.values():
            stop.set()  # each generate() ends at its next step
        _, running = wait(jobs, timeout=timeout)
        if running:
            bt.logging.warning(f"{len(running)} local generation(s) still running after {timeout:g}s")

    def _background_load(self) -> "Future[LoadedModel]":
        """The one load in progress, started now if none is (or the last one failed).

        A daemon thread, so stopping the miner never waits for a load nobody needs any more. Its
        future is running from the start: a request giving up on it cannot cancel it for others.
        """
        with self._loading_lock:
            if self._loading is None or (self._loading.done() and self._loading.exception()):
                bt.logging.warning(
                    f"loading the local model {self.model} on {self.device}: requests that need it "
                    "wait for it (--fallback.preload loads it at start instead)"
                )
                future: Future[LoadedModel] = Future()
                future.set_running_or_notify_cancel()
                threading.Thread(
                    target=self._load_into, args=(future,), name="local-load", daemon=True
                ).start()
                self._loading = future
            return self._loading

    def _load_into(self, future: "Future[LoadedModel]") -> None:
        try:
            future.set_result(self.load())
        except BaseException as exc:  # handed to every waiting request, which reports it
            bt.logging.error(f"could not load the local model {self.model!r}: {type(exc).__name__}: {exc}")
            future.set_exception(exc)

    def models(self) -> frozenset[str]:
        return frozenset({self.model, os.path.basename(self.model)})

    # ---------------------------------------------------------------------------------------------

    def _plan(self, loaded: LoadedModel, sampling: Sampling) -> _Plan:
        temperature = self.temperature if sampling.temperature is None else sampling.temperature
        max_new = self.max_new_tokens if sampling.max_tokens is None else min(sampling.max_tokens, self.max_new_tokens)
        return _Plan(
            temperature=max(temperature, 0.0),
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            max_new_tokens=max(max_new, 1),
            seed=sampling.seed,
            stop=tuple(sampling.stop),
            top_logprobs=sampling.top_logprobs,
            tools=tuple(dict(tool) for tool in sampling.tools) if takes_tools(loaded.tokenizer) else (),
        )

    def _penalty(self, loaded: LoadedModel) -> float | None:
        own = getattr(loaded.model.generation_config, "repetition_penalty", None)
        penalty = own if own not in (None, 1.0) else self.repetition_penalty
        return None if penalty == 1.0 else float(penalty)

    def plain_reason(self, loaded: LoadedModel, plan: _Plan) -> str | None:
        """Why this request cannot join the batch (None: it can)."""
        if not self.batching:
            return "batching is off"
        if plan.seed is not None:
            return "a seed needs a random generator of its own"
        if plan.top_logprobs is not None:
            return "the batch gives no alternative tokens' logprobs"
        if plan.top_k or (plan.top_p is not None and plan.top_p < 1.0):
            return "top-k/top-p would sort the whole vocabulary for every request in the batch"
        return self._batch_unavailable or _cannot_batch(loaded.model)

    async def produce(
        self,
        messages: Sequence[Message],
        queue: "asyncio.Queue[Item]",
        deadline: float,
        sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        loop = asyncio.get_running_loop()
        loaded = self._loaded
        if loaded is None:
            try:
                loaded = await asyncio.wrap_future(self._background_load())
            except Exception as exc:
                raise UpstreamError(
                    f"could not load local model {self.model!r}: {type(exc).__name__}"
                ) from exc
        if time.monotonic() >= deadline:
            return
        slots = self._semaphore(loop)
        self._waiting += 1
        try:
            await asyncio.wait_for(slots.acquire(), timeout=max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            bt.logging.debug("local model busy until the deadline: nothing produced")
            return
        finally:
            self._waiting -= 1
        plan = self._plan(loaded, sampling)
        chat = template_chat(messages, tools=takes_tools(loaded.tokenizer))
        release = True
        try:
            input_ids = await asyncio.to_thread(self._prompt, loaded, chat, plan)
            generated: int | None = None
            if self.plain_reason(loaded, plan) is None:
                batch = await self._running_batch(loaded)
                if batch is not None:
                    generated = await self._produce_batched(batch, loaded, input_ids, plan, queue, deadline)
            if generated is None:
                release = False  # the plain path frees its place when its thread really ends
                generated = await self._produce_plain(loaded, input_ids, plan, queue, deadline, slots)
        finally:
            if release:
                slots.release()
        reason = "length" if generated >= plan.max_new_tokens else "stop"
        queue.put_nowait(Finish(reason, Usage(len(input_ids), generated)))

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.max_batch))
        return self._slots[1]

    def _prompt(self, loaded: LoadedModel, chat: list[dict[str, Any]], plan: _Plan) -> list[int]:
        try:
            ids = _templated(loaded, chat, plan.tools)
        except jinja2.TemplateError as error:
            if not plan.tools:
                raise
            # The fronts check only that tools are objects: ones this template cannot render are left out.
            bt.logging.debug(f"the local model's chat template cannot render these tools ({error}); answering without")
            ids = _templated(loaded, chat, ())
        room = self._prompt_room(loaded)
        if room is not None and len(ids) > room:
            bt.logging.info(
                f"prompt of {len(ids)} tokens is over the local model's context: keeping its last {room}"
            )
            ids = ids[-room:]
        return list(ids)

    def _prompt_room(self, loaded: LoadedModel) -> int | None:
        """Most prompt tokens that leave room for the answer in the model's context (None: unknown)."""
        context = _context(loaded.model)
        if context is None:
            return None
        return context - min(self.max_new_tokens, context // 2)

    # ------------------------------------------------------------------------------- the batch ---

    async def _running_batch(self, loaded: LoadedModel) -> "Batch | None":
        batch = self._batch
        if batch is not None and batch.alive():
            return batch
        return await asyncio.to_thread(self._start_batch, loaded)

    def _start_batch(self, loaded: LoadedModel) -> "Batch | None":
        with self._batch_lock:
            if self._batch is not None and self._batch.alive():
                return self._batch
            if self._batch is not None:
                bt.logging.warning("the local model's batch stopped: starting a fresh one")
                self._batch.close()
                self._batch = None
            try:
                manager = self._new_manager(loaded)
                # Its thread inherits this daemon thread's daemon flag: it never holds up an exit.
                starter = threading.Thread(target=manager.start, name="local-batch-start", daemon=True)
                starter.start()
                starter.join()
            except Exception as exc:
                self._batch_unavailable = f"continuous batching failed to start ({type(exc).__name__})"
                bt.logging.warning(f"local model: {self._batch_unavailable}: {exc}; using generate()")
                return None
            self._batch = Batch(manager, loaded.tokenizer)
            return self._batch

    def _new_manager(self, loaded: LoadedModel) -> Any:
        _, ContinuousBatchingConfig = cb_classes()
        model, tokenizer = loaded.model, loaded.tokenizer
        config = copy.deepcopy(model.generation_config)
        config.do_sample = True
        # The value only makes the per-request temperature exist: every request passes its own. No
        # top-k/top-p: their two full-vocabulary sorts per row and step would slow every request
        # (about a third of a CPU step); a request asking for them takes the plain path.
        config.temperature, config.top_k, config.top_p = 0.5, 0, 1.0
        config.repetition_penalty = None  # dropped by the batch: ours replaces it
        config.max_new_tokens = self.max_new_tokens
        config.num_return_sequences = 1
        if config.eos_token_id is None:
            config.eos_token_id = tokenizer.eos_token_id
        context = _context(model) or 4096
        cache_tokens = max(context, self.max_batch * min(context, CACHE_TOKENS_PER_REQUEST))
        page = 256
        cb_config = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=math.ceil(cache_tokens / page),
            max_batch_tokens=STEP_TOKENS["cuda" if loaded.device.startswith("cuda") else "cpu"],
            max_requests_per_batch=self.max_batch,
            use_cuda_graph=False,  # the repetition guard reads each step's histories on the host
            use_async_batching=False,
            auto_switch_to_flash=False,  # keep the attention the plain path shares
            per_request_processors=True,
            drop_unsupported_processors=True,
        )
        manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
        lazy_cache(manager)  # its cache resident only where requests write it
        loop = manager._run_generation_loop

        def run_on_our_threads(**kwargs: Any) -> None:  # the manager's own thread, started by start()
            adopt_threads()
            loop(**kwargs)

        manager._run_generation_loop = run_on_our_threads
        processors = manager.logit_processor
        repetition, greedy = batch_processors(self._penalty(loaded), exempt(loaded))
        processors.logits_processor.insert(0, repetition)  # before temperature, as in generate()
        processors.logits_processor.append(greedy)  # after top-k/top-p: the best token survives them
        processors.tensors_required += 2
        processors._retrieve_processors_kwargs()
        processors.do_processing = True
        return manager

    async def _produce_batched(
        self,
        batch: Batch,
        loaded: LoadedModel,
        input_ids: list[int],
        plan: _Plan,
        queue: "asyncio.Queue[Item]",
        deadline: float,
    ) -> int:
        """The answer from the running batch; returns how many tokens it generated."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()
        stops = StopStrings(plan.stop)

        def deliver(texts: list[str], finished: bool, error: str | None) -> None:
            if done.done():
                return
            for text in texts:
                for piece in stops.feed(text):
                    queue.put_nowait(piece)
            if stops.stopped:
                done.set_result(None)
            elif finished:
                done.set_result(error)

        kwargs: dict[str, Any] = {
            "greedy": int(plan.temperature == 0),
            "temperature": float(plan.temperature or 1.0),
        }
        supported = batch.manager.logit_processor.supported_keys
        kwargs = {key: value for key, value in kwargs.items() if key in supported}
        request = BatchRequest(Decoder(loaded.tokenizer), loop, deliver)
        request_id = batch.add(input_ids, request, plan.max_new_tokens, **kwargs)
        try:
            error = await asyncio.wait_for(asyncio.shield(done), timeout=max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            return request.seen  # the deadline: the finally below takes it out of the batch
        finally:
            if not done.done() or stops.stopped:
                batch.cancel(request_id)
            if not done.done():
                done.cancel()
        if error is not None:
            bt.logging.warning(f"local generation failed in the batch: {error[:200]}")
            raise UpstreamError("local model failed while generating")
        return request.seen

    # ------------------------------------------------------------------------------- plain path ---

    async def _produce_plain(
        self,
        loaded: LoadedModel,
        input_ids: list[int],
        plan: _Plan,
        queue: "asyncio.Queue[Item]",
        deadline: float,
        slots: asyncio.Semaphore,
    ) -> int:
        """The answer from a ``generate()`` call of its own; returns how many tokens it generated."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        try:
            job = self._executor.submit(self._generate, loaded, input_ids, plan, loop, queue, stop, deadline)
        except BaseException:
            slots.release()
            raise
        with self._count_lock:
            self._plain_jobs[job] = stop  # for close(): stopped, and waited for, when the miner stops
        job.add_done_callback(self._plain_ended)
        # The place is freed when the thread really ends, not when this request gives up on it.
        job.add_done_callback(lambda _: _release_soon(loop, slots))
        try:
            return await asyncio.wrap_future(job)
        except Exception as exc:
            bt.logging.warning(f"local generation failed: {type(exc).__name__}")
            raise UpstreamError(f"local model failed while generating: {type(exc).__name__}") from exc
        finally:
            stop.set()

    def _plain_ended(self, job: "Future[None]") -> None:
        with self._count_lock:
            self._plain_jobs.pop(job, None)

    def _generate(
        self,
        loaded: LoadedModel,
        input_ids: list[int],
        plan: _Plan,
        loop: asyncio.AbstractEventLoop,
        queue: "asyncio.Queue[Item]",
        stop: threading.Event,
        deadline: float,
    ) -> int:
        if stop.is_set():  # abandoned while waiting for a thread: skip the prefill too
            return 0
        adopt_threads()
        with self._count_lock:
            self._plain += 1
        try:
            tokenizer = loaded.tokenizer
            decoder = Decoder(tokenizer)
            stops = StopStrings(plan.stop)
            generated = 0

            def put(items: "list[str | Token]") -> None:
                if not stop.is_set():
                    for item in items:
                        queue.put_nowait(item)

            def on_token(token_id: int, logprob: float, top: list[tuple[int, float]]) -> None:
                nonlocal generated
                generated += 1
                if stop.is_set() or stops.stopped:
                    return
                item: "str | Token | None" = (
                    decoder.push_token(token_id, logprob, top)
                    if plan.top_logprobs is not None
                    else decoder.push(token_id)
                )
                if item:
                    items = stops.feed(item)
                    if items:
                        loop.call_soon_threadsafe(put, items)

            ids = torch.tensor([input_ids], device=loaded.device)
            pick = _Pick(plan.temperature, plan.top_k, plan.top_p, plan.seed, plan.top_logprobs, on_token)
            loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=plan.max_new_tokens,
                pad_token_id=(
                    tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
                ),
                logits_processor=LogitsProcessorList(
                    [_AnswerPenalty(len(input_ids), self._penalty(loaded), exempt(loaded)), pick]
                ),
                stopping_criteria=StoppingCriteriaList([_StopWhen(stop, deadline, stops)]),
            )
            return generated
        finally:
            with self._count_lock:
                self._plain -= 1


def _context(model: PreTrainedModel) -> int | None:
    context = getattr(model.config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def _cannot_batch(model: PreTrainedModel) -> str | None:
    if not callable(getattr(model, "init_continuous_batching", None)):
        return "the model has no continuous batching"
    attention = getattr(model.config, "_attn_implementation", None)
    if attention != "sdpa" and not str(attention).startswith("flash"):
        return f"continuous batching would switch the shared model's {attention} attention"
    return None


def _templated(loaded: LoadedModel, chat: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[int]:
    # Control tokens typed by the validator stay text: only the template writes real ones.
    return loaded.tokenizer.apply_chat_template(
        chat,
        tools=list(tools) or None,
        add_generation_prompt=True,
        sanitize_control_tokens=True,
        return_dict=True,
    )["input_ids"]


def takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` (transformers passes them to it as such)."""
    return "tools" in str(getattr(tokenizer, "chat_template", None) or "")


def template_chat(messages: Sequence[Message], *, tools: bool) -> list[dict[str, Any]]:
    """The conversation as a chat template takes it. With ``tools``: an assistant's tool calls (in
    transformers' shape, arguments parsed) and tool results with their call's id; without, as
    plain text, a tool's result said by the user."""
    chat: list[dict[str, Any]] = []
    for message in messages:
        turn: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.role == "tool":
            turn = {**turn, "tool_call_id": message.tool_call_id} if tools else {"role": "user", "content": message.content}
        elif tools and message.tool_calls:
            calls = [  # a template takes arguments parsed: those that do not parse are left out
                {"type": "function", "id": call.id, "function": {"name": call.name, "arguments": arguments}}
                for call in message.tool_calls
                if (arguments := call.parsed()) is not None
            ]
            if calls:
                turn["tool_calls"] = calls
        chat.append(turn)
    return chat
