"""The results as a markdown table, ready to paste in README (``latest.md``)."""

from typing import Any


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _pair(miner: float | None, baseline: float | None, digits: int = 1) -> str:
    return f"{_num(miner, digits)} \\| {_num(baseline, digits)}"


def _pct(figure: dict[str, Any]) -> tuple[float | None, float | None]:
    return figure.get("p50"), figure.get("p99")


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    s = results["settings"]
    miner, baseline = results["kinds"]["miner"], results["kinds"]["baseline"]
    lines = [
        f"Command: `{meta.get('command', 'python -m bench')}` — {meta.get('machine', '')}"
        + (f"; 1-min load average {meta['load_average_1m'][0]:g} before, {meta['load_average_1m'][1]:g} after"
           if meta.get("load_average_1m") else ""),
        "",
        f"Upstream: {s['tokens']} tokens, one every {s['interval'] * 1000:g} ms; batches of "
        f"{s['batch_size']} tokens; {s['repeats']} runs per case ({s['single_runs']} at 1 stream). "
        "Each cell: **this miner \\| SN1-pattern baseline**, same run, same upstream.",
        "",
        "| streams | added TTFC p50 / p99 (ms) | per-chunk added p50 / p99 (ms) | wall (s) | "
        "concurrency ratio | tokens/s | miner CPU s / 1k tokens | peak RSS (MB) | errors |",
        "|---:|---|---|---|---|---|---|---|---|",
    ]
    for k, m in miner["concurrency"].items():
        b = baseline["concurrency"][k]
        (mt50, mt99), (bt50, bt99) = _pct(m["added_ttfc_ms"]), _pct(b["added_ttfc_ms"])
        (mc50, mc99), (bc50, bc99) = _pct(m["chunk_added_ms"]), _pct(b["chunk_added_ms"])
        lines.append(
            f"| {k} | {_num(mt50)} / {_num(mt99)} \\| {_num(bt50)} / {_num(bt99)} "
            f"| {_num(mc50)} / {_num(mc99)} \\| {_num(bc50)} / {_num(bc99)} "
            f"| {_pair(m['wall_s'], b['wall_s'], 2)} "
            f"| {_pair(m['concurrency_ratio'], b['concurrency_ratio'], 2)} "
            f"| {_pair(m['tokens_per_s'], b['tokens_per_s'], 0)} "
            f"| {_pair(m['cpu_s_per_1k_tokens'], b['cpu_s_per_1k_tokens'], 3)} "
            f"| {_pair(m['peak_rss_mb'], b['peak_rss_mb'], 0)} "
            f"| {m['errors']} \\| {b['errors']} |"
        )
    one = miner["concurrency"][str(min(s["streams"]))]
    lines += [
        "",
        "Added TTFC: the first chunk's arrival at the validator minus the time the upstream wrote the "
        "last token in it; per-chunk added: the same for every chunk (chunks may coalesce; the words "
        "are counted). Counted from the upstream's *first* token instead, TTFC also holds the wait for "
        f"a full batch ({s['batch_size'] - 1} × {s['interval'] * 1000:g} ms by design): p50 "
        f"{_num(one['ttfc_vs_first_token_ms']['p50'])} ms at {min(s['streams'])} stream. Latency "
        "percentiles pool every run; wall, tokens/s and CPU are medians of the runs. Miner CPU and "
        "RSS are the miner process's own (`/proc`); validators and upstream run in other processes.",
    ]
    ratios = results["baseline_over_miner"]
    lines += [
        "",
        "Baseline ÷ this miner, same run (above 1: this miner is better):",
        "",
        "| streams | wall | added TTFC p50 | per-chunk added p50 | validator's TTFC p50 | CPU per token |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in miner["concurrency"]:
        r = ratios[k]
        lines.append(
            f"| {k} | {_num(r['wall'], 2)} | {_num(r['added_ttfc_p50'], 2)} | {_num(r['chunk_added_p50'], 2)} "
            f"| {_num(r['validator_ttfc_p50'], 2)} | {_num(r['cpu_s_per_1k_tokens'], 2)} |"
        )
    mt, bt_ = miner["throughput"], baseline["throughput"]
    lines += [
        "",
        f"Throughput ({max(s['streams'])} streams of {s['throughput_tokens']} tokens, upstream interval 0): "
        f"**{_num(mt['tokens_per_s'], 0)} tokens/s** \\| {_num(bt_['tokens_per_s'], 0)}; "
        f"miner CPU {_num(mt['cpu_s_per_1k_tokens'], 3)} \\| {_num(bt_['cpu_s_per_1k_tokens'], 3)} s per 1k tokens; "
        f"cores busy (miner / validators / upstream): {_num(mt['miner_cpu_cores'], 2)} / "
        f"{_num(mt['validator_cpu_cores'], 2)} / {_num(mt['upstream_cpu_cores'], 2)}.",
    ]
    soak = miner.get("soak")
    if soak:
        rss = " → ".join(f"{mb:.1f} MB at {n}" for n, mb in soak["rss_mb"].items())
        base = baseline.get("soak") or {}
        base_rss = " → ".join(f"{mb:.1f}" for mb in (base.get("rss_mb") or {}).values())
        lines += [
            "",
            f"Soak ({soak['requests']:,} sequential requests after {soak['warmup_requests']} warm-up): "
            f"miner RSS {rss} (slope over the second half "
            f"{_num(soak['slope_mb_per_1k_requests_second_half'], 2)} MB per 1k requests, "
            f"{soak['errors']} errors); baseline {base_rss} MB.",
        ]
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for target in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        lines.append(f"| {target['target']} | {_num(target['value'], 2)} | {met} |")
    return "\n".join(lines) + "\n"
