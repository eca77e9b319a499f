"""The plot: added TTFC and concurrency ratio against concurrent streams, this miner vs the references."""

import io
from pathlib import Path
from typing import Any

LABELS = {"miner": "openai-miner", "thin": "thin reference (SSE by hand)", "baseline": "SN1 pattern (sync iterator)"}
COLOURS = {"miner": "tab:blue", "thin": "tab:green", "baseline": "tab:red"}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = results["settings"]["streams"]
    figure, (ttfc, ratio) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for kind, data in results["kinds"].items():
        cases = [data["concurrency"][str(k)] for k in streams]
        p50 = [case["added_ttfc_ms"]["p50"] for case in cases]
        p99 = [case["added_ttfc_ms"]["p99"] for case in cases]
        colour, label = COLOURS[kind], LABELS[kind]
        ttfc.plot(streams, p50, "o-", color=colour, label=f"{label} p50")
        ttfc.plot(streams, p99, "^--", color=colour, alpha=0.6, label=f"{label} p99")
        ratio.plot(streams, [case["concurrency_ratio"] for case in cases], "o-", color=colour, label=label)
    ratio.plot(streams, [k / streams[0] for k in streams], ":", color="grey", label="one at a time (k×)")
    ratio.axhline(1.0, color="grey", linewidth=0.8)
    ratio.axhline(1.3, color="green", linewidth=0.8, linestyle="--", label="target at 32 streams (1.3×)")
    ttfc.axhline(5.0, color="green", linewidth=0.8, linestyle="--", label="target p50 at 1 stream (5 ms)")
    for axes in (ttfc, ratio):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(streams, [str(k) for k in streams])
        axes.set_xlabel("concurrent streams")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    ttfc.set_ylabel("ms")
    ttfc.set_title("Added time to first chunk (validator − upstream)", fontsize=10)
    ratio.set_ylabel("wall time ÷ wall time of 1 stream")
    ratio.set_title("Concurrency ratio (lower is better, 1 = free)", fontsize=10)
    s = results["settings"]
    figure.suptitle(
        f"{s['tokens']} tokens every {s['interval'] * 1000:g} ms, batches of {s['batch_size']} — "
        f"{results.get('meta', {}).get('machine', '')}",
        fontsize=9,
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    from PIL import Image  # matplotlib's own dependency

    # a 64-colour palette: the same picture at about a third of the bytes, for the repository
    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)
