"""The benchmarks' smoke runs: each runs end to end on 127.0.0.1 and writes its JSON (timings unchecked).

CI runs only these; the benchmarks themselves are ``python -m bench`` and
``python -m bench.first_failure`` (see README).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each starts real processes (seconds of imports each): CI runs them, -m "not slow" not

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str, cwd: Path, timeout: float) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_smoke_run_writes_results(tmp_path: Path) -> None:
    run_bench("bench", "--smoke", "--no-plot", "--out", str(tmp_path), cwd=tmp_path, timeout=120)

    results = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text().startswith("Command: `python -m bench --smoke")
    assert set(results["kinds"]) == {"miner", "thin", "baseline"}
    streams = [str(k) for k in results["settings"]["streams"]]
    for kind, data in results["kinds"].items():
        for k in streams:
            case = data["concurrency"][k]
            # a stray error (e.g. a keep-alive race) is data, not a failure; all of them failing is
            assert case["errors"] < case["runs"] * int(k), (kind, k, case["error_examples"])
            assert case["wall_s"] > 0 and case["concurrency_ratio"] > 0
            assert case["added_ttfc_ms"]["n"] >= 1 and case["chunk_added_ms"]["p50"] is not None
            # CPU is read in clock ticks (10 ms): a smoke case may cost less than one
            assert case["tokens_per_s"] > 0 and case["cpu_s_per_1k_tokens"] >= 0 and case["peak_rss_mb"] > 0
        assert data["throughput"]["24"]["tokens_per_s"] > 0
        assert data["soak"]["errors"] < data["soak"]["requests"] and data["soak"]["rss_mb"]["0"] > 0
    assert results["baseline_over_miner"][streams[-1]]["wall"] > 0
    assert results["miner_over_thin"]["throughput"]["24"]["tokens_per_s"] > 0
    assert {target["target"] for target in results["targets"]} and results["meta"]["command"]


def test_first_failure_bench_answers_every_first_failing_request_lazy_or_preloaded(tmp_path: Path, tiny_model: str) -> None:
    """The real ``openai-miner`` process, upstream 500: every validator gets local text in both modes."""
    run_bench(
        "bench.first_failure", "--runs", "1", "--validators", "2", "--timeout", "30", "--model", tiny_model,
        "--out", str(tmp_path), cwd=tmp_path, timeout=240,
    )
    results = json.loads((tmp_path / "first_failure.json").read_text())
    assert (tmp_path / "first_failure.md").read_text().startswith("Command: `python -m bench.first_failure")
    assert set(results["modes"]) == {"preloaded", "lazy"}
    for mode, figures in results["modes"].items():
        (run,) = figures["runs"]
        assert [s["status"] for s in run["streams"]] == [200, 200], (mode, run)
        assert all(s["chars"] > 0 and s["ttfc_s"] is not None for s in run["streams"]), (mode, run)
        assert figures["answered"] == figures["asked"] == 2
        # the lazy load is announced once, not per waiting request; a preloaded model never waits
        assert run["load_logged"] == (1 if mode == "lazy" else 0), (mode, run)


def test_http_front_bench_runs_beside_its_pass_through(tmp_path: Path) -> None:
    """Both servers answer every stream with the upstream's exact text, signed and plain."""
    run_bench("bench.http_front", "--smoke", "--out", str(tmp_path), cwd=tmp_path, timeout=180)
    results = json.loads((tmp_path / "http.json").read_text())
    assert (tmp_path / "http.md").read_text().startswith("Command: `python -m bench.http_front --smoke")
    for kind in ("http", "passthrough"):
        for k, case in results["kinds"][kind]["concurrency"].items():
            assert case["errors"] == 0, (kind, k, case["error_examples"])
            assert case["added_ttfc_ms"]["n"] == int(k) and case["tokens_per_s"] > 0
        assert results["kinds"][kind]["throughput"]["tokens_per_s"] > 0
    assert results["http_over_passthrough"]["4"]["wall"] > 0


def test_outage_bench_answers_every_validator_batched_and_one_at_a_time(tmp_path: Path, tiny_model: str) -> None:
    """The real ``openai-miner`` process, upstream 500: every validator gets local text in both modes."""
    run_bench(
        "bench.outage", "--validators", "1", "3", "--timeout", "30", "--model", tiny_model,
        "--out", str(tmp_path), cwd=tmp_path, timeout=240,
    )
    results = json.loads((tmp_path / "outage.json").read_text())
    assert (tmp_path / "outage.md").read_text().startswith("Command: `python -m bench.outage")
    assert set(results["modes"]) == {"batched", "one at a time"}
    for mode, cases in results["modes"].items():
        for count, case in cases.items():
            assert case["answered_with_text"] == case["asked"] == int(count), (mode, case)
            assert case["first_chunk_s"]["p50"] is not None and case["local_tokens_per_s"] > 0, (mode, case)


def test_hostile_bench_runs_every_attack_beside_a_quiet_run(tmp_path: Path, tiny_model: str) -> None:
    """The real ``openai-miner`` process under each attack; validators answered throughout on both
    fronts, the local model answering when the upstream stalls or fails (timings unchecked:
    ``python -m bench.hostile`` reports them)."""
    from bench.hostile import ATTACKS, IDLE_SOCKETS, LOCAL_CASES

    run_bench(
        "bench.hostile", "--asks", "2", "--ramp", "1", "--hold", "0", "--local-timeout", "6",
        "--model", tiny_model, "--out", str(tmp_path), cwd=tmp_path, timeout=300,
    )
    results = json.loads((tmp_path / "hostile.json").read_text())
    assert (tmp_path / "hostile.md").read_text().startswith("Command: `python -m bench.hostile")
    cases = results["cases"]
    assert list(cases) == ["quiet", *ATTACKS, *LOCAL_CASES]
    for kind in ("quiet", *ATTACKS):
        assert cases[kind]["answered_with_text"] == cases[kind]["asked"] == 4, (kind, cases[kind])
        assert set(cases[kind]["by_front"]) == {"axon", "http"}, (kind, cases[kind])
    assert cases["flood"]["attack"]["got"].get("403", 0) > 0  # refused, then cut off
    assert cases["idle"]["attack"]["connections"] == 2 * IDLE_SOCKETS
    assert cases["junk"]["attack"]["got"].get("400", 0) > 0
    assert set(cases["100k messages"]["attack"]["got"]) == {"413"}  # refused before any work
    for kind in LOCAL_CASES:
        assert cases[kind]["answered_locally"] >= 5, (kind, cases[kind])


def test_local_load_bench_runs_every_case_quiet_and_with_a_core_busy(tmp_path: Path, tiny_model: str) -> None:
    from bench.local_load import CASES, LOADS

    run_bench(
        "bench.local_load", "--validators", "2", "--timeout", "4", "--cut-timeout", "2", "--model", tiny_model,
        "--out", str(tmp_path), cwd=tmp_path, timeout=240,
    )
    results = json.loads((tmp_path / "local_load.json").read_text())
    assert (tmp_path / "local_load.md").read_text().startswith("Command: `python -m bench.local_load")
    cases = results["threads"]["0"]
    assert set(cases) == {f"{name}, {load}" for name in CASES for load in LOADS}
    for name, case in cases.items():
        assert case["answered_with_text"] == case["asked"] == 2, (name, case)
    assert all("busy_after_cut_s" in cases[f"cut, {load}"] for load in LOADS)


def test_loosh_bench_runs_the_sn78_front_beside_its_reference(tmp_path: Path) -> None:
    """Both servers handshake every validator and answer every challenge with the upstream's exact
    text, from one upstream call each (timings unchecked: ``python -m bench.loosh`` reports them)."""
    run_bench("bench.loosh", "--smoke", "--out", str(tmp_path), cwd=tmp_path, timeout=60)
    results = json.loads((tmp_path / "loosh.json").read_text())
    assert (tmp_path / "loosh.md").read_text().startswith("Command: `python -m bench.loosh --smoke")
    levels = [str(k) for k in results["settings"]["levels"]]
    for kind in ("front", "reference"):
        assert results["kinds"][kind]["handshake_ms"]["n"] == int(levels[-1])
        for k in levels:
            case = results["kinds"][kind]["levels"][k]
            assert case["errors"] == 0, (kind, k, case["error_examples"])
            assert case["answer_ms"]["n"] == int(k) * case["rounds"] and case["wall_s"] > 0
            assert case["upstream_calls_per_challenge"] == 1
    assert all(results["front_over_reference_wall"][k] > 0 for k in levels)
    assert {target["target"] for target in results["targets"]} and results["meta"]["load_average_1m"]
