"""The results as a markdown table, ready to paste in README (``latest.md``)."""

from typing import Any

ORDER = ("miner", "thin", "baseline")  # each cell: this miner | thin reference | SN1 pattern


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _cell(cases: list[dict[str, Any]], get: Any, digits: int = 1) -> str:
    return " \\| ".join(_num(get(case), digits) for case in cases)


def _pcts(cases: list[dict[str, Any]], figure: str) -> str:
    return " \\| ".join(f"{_num(case[figure]['p50'])} / {_num(case[figure]['p99'])}" for case in cases)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    s = results["settings"]
    kinds = [results["kinds"][kind] for kind in ORDER]
    miner = results["kinds"]["miner"]
    lines = [
        f"Command: `{meta.get('command', 'python -m bench')}` — {meta.get('machine', '')}"
        + (f"; 1-min load average {meta['load_average_1m'][0]:g} before, {meta['load_average_1m'][1]:g} after"
           if meta.get("load_average_1m") else ""),
        "",
        f"Upstream: {s['tokens']} tokens, one every {s['interval'] * 1000:g} ms; batches of "
        f"{s['batch_size']} tokens; {s['repeats']} runs per case ({s['single_runs']} at 1 stream). "
        "Each cell: **this miner \\| thin reference \\| SN1-pattern baseline**, same run, same upstream.",
        "",
        "| streams | added TTFC p50 / p99 (ms) | per-chunk added p50 / p99 (ms) | wall (s) | "
        "concurrency ratio | tokens/s | miner CPU s / 1k tokens | peak RSS (MB) | errors |",
        "|---:|---|---|---|---|---|---|---|---|",
    ]
    for k in miner["concurrency"]:
        cases = [kind["concurrency"][k] for kind in kinds]
        lines.append(
            f"| {k} | {_pcts(cases, 'added_ttfc_ms')} | {_pcts(cases, 'chunk_added_ms')} "
            f"| {_cell(cases, lambda c: c['wall_s'], 2)} | {_cell(cases, lambda c: c['concurrency_ratio'], 2)} "
            f"| {_cell(cases, lambda c: c['tokens_per_s'], 0)} | {_cell(cases, lambda c: c['cpu_s_per_1k_tokens'], 3)} "
            f"| {_cell(cases, lambda c: c['peak_rss_mb'], 0)} | {_cell(cases, lambda c: c['errors'], 0)} |"
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
        "RSS are each server process's own (`/proc`); validators and upstream run in other processes.",
    ]
    thin = results["miner_over_thin"]
    lines += [
        "",
        f"Throughput: {max(s['streams'])} streams at once, upstream unpaced. Cells: this miner \\| thin \\| baseline.",
        "",
        "| tokens an answer | tokens/s | miner ÷ thin | miner ÷ baseline | CPU ms / token | CPU miner ÷ thin "
        "| cores busy: server / validators / upstream |",
        "|---:|---|---:|---:|---|---:|---|",
    ]
    for n in miner["throughput"]:
        cases = [kind["throughput"][n] for kind in kinds]
        busy = " \\| ".join(
            f"{_num(c['miner_cpu_cores'], 2)} / {_num(c['validator_cpu_cores'], 2)} / {_num(c['upstream_cpu_cores'], 2)}"
            for c in cases
        )
        lines.append(
            f"| {n} | {_cell(cases, lambda c: c['tokens_per_s'], 0)} | **{_num(thin['throughput'][n]['tokens_per_s'], 2)}** "
            f"| {_num(results['baseline_over_miner']['throughput_tokens_per_s_miner_over_baseline'][n], 2)} "
            f"| {_cell(cases, lambda c: c['cpu_s_per_1k_tokens'], 3)} "
            f"| {_num(thin['throughput'][n]['cpu_s_per_1k_tokens'], 2)} | {busy} |"
        )
    ratios = results["baseline_over_miner"]
    lines += [
        "",
        "Baseline ÷ this miner, and this miner's wall ÷ the thin reference's, same run:",
        "",
        "| streams | wall | added TTFC p50 | per-chunk added p50 | validator's TTFC p50 | CPU per token | wall, miner ÷ thin |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in miner["concurrency"]:
        r = ratios[k]
        lines.append(
            f"| {k} | {_num(r['wall'], 2)} | {_num(r['added_ttfc_p50'], 2)} | {_num(r['chunk_added_p50'], 2)} "
            f"| {_num(r['validator_ttfc_p50'], 2)} | {_num(r['cpu_s_per_1k_tokens'], 2)} | {_num(thin['wall'][k], 2)} |"
        )
    soak = miner.get("soak")
    if soak:
        rss = " → ".join(f"{mb:.1f} MB at {n}" for n, mb in soak["rss_mb"].items())
        others = "; ".join(
            f"{kind} " + " → ".join(f"{mb:.1f}" for mb in (results["kinds"][kind].get("soak") or {}).get("rss_mb", {}).values()) + " MB"
            for kind in ORDER[1:]
        )
        lines += [
            "",
            f"Soak ({soak['requests']:,} sequential requests after {soak['warmup_requests']} warm-up): "
            f"miner RSS {rss} (slope over the second half "
            f"{_num(soak['slope_mb_per_1k_requests_second_half'], 2)} MB per 1k requests, "
            f"{soak['errors']} errors); {others}.",
        ]
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for target in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        lines.append(f"| {target['target']} | {_num(target['value'], 3)} | {met} |")
    return "\n".join(lines) + "\n"
