"""The test kit as a subnet author meets it: one import, the real command in a child process, the
SSE reader, and README's example, run here so that it cannot rot."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

import openai_miner.testing as kit
from openai_miner.testing import (
    OPEN_TO_ALL,
    LoopbackUpstream,
    LooshValidator,
    MinerFailed,
    MinerProcess,
    ask_http,
    free_port,
    make_wallet,
    miner_argv,
    miner_env,
    signing_client,
    sse_event,
    sse_events,
    ToolCall,
)
from openai_miner.testing.upstream import completion_tokens, usage

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_star_import_gives_exactly_all_and_every_name_resolves() -> None:
    names: dict = {}
    exec("from openai_miner.testing import *", names)
    assert sorted(set(names) - {"__builtins__"}) == sorted(kit.__all__)
    assert sorted(kit.__all__) == sorted(kit._HOMES) and len(set(kit.__all__)) == len(kit.__all__)
    assert all(names[name] is getattr(kit, name) for name in kit.__all__)
    with pytest.raises(AttributeError, match="no attribute 'MinerProces'"):
        kit.MinerProces


def test_importing_the_kit_loads_nothing_until_a_name_is_used() -> None:
    probe = (
        "import sys, openai_miner.testing as kit; before = 'bittensor' in sys.modules; kit.LoopbackUpstream; "
        "print(before, 'bittensor' in sys.modules, 'openai_miner.testing.upstream' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False", "True"], done.stdout + done.stderr


def test_sse_event_reads_openai_stream_lines() -> None:
    assert sse_event('data: {"choices": []}') == {"choices": []}
    assert sse_event('data:{"a": 1}') == {"a": 1}  # the space after the colon is optional
    assert [sse_event(line) for line in ("data: [DONE]", "", ": keep-alive", "event: ping")] == [None] * 4
    body = b'data: {"n": 1}\n\n: comment\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    assert list(sse_events(body)) == [{"n": 1}, {"n": 2}] == list(sse_events(body.decode()))


@pytest.mark.slow
async def test_miner_process_serves_the_real_command_then_stops_it_cleanly(tmp_path: Path) -> None:
    wallets, http_port = tmp_path / "wallets", free_port()
    validator, miner_keys = make_wallet(wallets, "validator"), make_wallet(wallets, "miner")
    with LoopbackUpstream(tokens=["one", " answer"]) as upstream:
        argv = miner_argv(
            wallets, free_port(), "--axon.off", "--http.port", str(http_port),
            "--openai.base_url", upstream.base_url, "--fallback.off", *OPEN_TO_ALL,
        )
        process = MinerProcess(argv, env=miner_env(tmp_path), cwd=tmp_path, log_file=tmp_path / "miner.log")
        with process:
            assert process.summary.startswith("openai-miner | network mock | netuid 1 | hotkey ")
            assert process.ports == {"http": http_port} and process.hotkey == miner_keys.hotkey.ss58_address
            async with signing_client(validator.hotkey, process.hotkey) as client:
                answer = await ask_http(client, http_port, "hello")
            assert answer.status == 200 and answer.text == "one answer", answer
    assert process.returncode == 0
    assert "openai-miner: stopped after 1 answers" in process.log
    assert (tmp_path / "miner.log").read_text() == process.log


@pytest.mark.slow
def test_a_command_that_exits_before_serving_fails_at_once_with_its_output(tmp_path: Path) -> None:
    process = MinerProcess(["--mock", "--fallback.device", "gpu"], env=miner_env(tmp_path), cwd=tmp_path)
    with pytest.raises(MinerFailed, match=r"exited with code 2 before serving:\n(.|\n)*unknown device 'gpu'"):
        with process:
            pass
    assert process.returncode == 2 and process.summary is None


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = README.read_text("utf-8").split("## The test kit (`openai_miner.testing`)", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example, "README's test-kit section has no python example"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its throwaway home, cleaned with the test's
    exec(compile(example[1], "README.md (the test kit)", "exec"), {"__name__": "readme_example"})


@pytest.mark.slow
async def test_an_sn78_validator_gets_text_tool_calls_and_usage_through_the_real_command(tmp_path: Path) -> None:
    """What issue 22 promised an SN78 validator: ``openai-miner --mock --loosh.port P``, asked as Loosh's
    validator asks (handshake, Fernet challenge with tools), answers with the upstream's text, its tool
    call's arguments byte for byte, the finish reason and the upstream's usage."""
    wallets, port = tmp_path / "wallets", free_port()
    validator, _ = make_wallet(wallets, "validator"), make_wallet(wallets, "miner")
    call = ToolCall("weather", ('{"city":', ' "Par', 'is"}'), id="call_sn78")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with LoopbackUpstream(tokens=["Let", " me", " look."], tool_calls=[call]) as upstream:
        argv = miner_argv(
            wallets, free_port(), "--axon.off", "--loosh.port", str(port),
            "--openai.base_url", upstream.base_url, "--fallback.off", *OPEN_TO_ALL,
        )
        with MinerProcess(argv, env=miner_env(tmp_path), cwd=tmp_path) as process:
            assert process.ports == {"loosh": port}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                asker = LooshValidator(validator.hotkey, client)
                assert await asker.available()
                reply = await asker.ask({"prompt": "weather in Paris?", "tools": tools, "tool_choice": "auto",
                                         "max_tokens": 256, "correlation_id": "c-e2e"})
            sent = upstream.requests[0].body
    assert reply.ok, reply
    assert reply.answer["response_text"] == "Let me look." and reply.answer["finish_reason"] == "tool_calls"
    assert reply.answer["correlation_id"] == "c-e2e"
    assert reply.tool_calls == [
        {"id": "call_sn78", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert reply.usage == usage(sent, completion_tokens(["Let", " me", " look."], [call]))
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert process.returncode == 0
