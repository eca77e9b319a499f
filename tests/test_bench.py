"""The benchmark's smoke run: it runs end to end on 127.0.0.1 and writes its JSON (figures unchecked).

CI runs only this; the benchmark itself is ``python -m bench`` (see README).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_results(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-plot", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text().startswith("Command: `python -m bench --smoke")
    assert set(results["kinds"]) == {"miner", "baseline"}
    streams = [str(k) for k in results["settings"]["streams"]]
    for kind, data in results["kinds"].items():
        for k in streams:
            case = data["concurrency"][k]
            # a stray error (e.g. a keep-alive race) is data, not a failure; all of them failing is
            assert case["errors"] < case["runs"] * int(k), (kind, k, case["error_examples"])
            assert case["wall_s"] > 0 and case["concurrency_ratio"] > 0
            assert case["added_ttfc_ms"]["n"] >= 1 and case["chunk_added_ms"]["p50"] is not None
            assert case["tokens_per_s"] > 0 and case["cpu_s_per_1k_tokens"] > 0 and case["peak_rss_mb"] > 0
        assert data["throughput"]["tokens_per_s"] > 0
        assert data["soak"]["errors"] < data["soak"]["requests"] and data["soak"]["rss_mb"]["0"] > 0
    assert results["baseline_over_miner"][streams[-1]]["wall"] > 0
    assert {target["target"] for target in results["targets"]} and results["meta"]["command"]
