"""How every benchmark records a run: what ran, where and when, and its JSON and markdown files."""

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

from bench import procstat


class Started:
    """Taken when a benchmark starts: its clock and the machine's load, for :meth:`meta`."""

    def __init__(self, module: str, argv: Sequence[str]) -> None:
        self.command = shlex.join(["python", "-m", module, *argv])
        self.clock = time.monotonic()
        self.load = os.getloadavg()[0]

    def meta(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "machine": procstat.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": round(time.monotonic() - self.clock, 1),
            # other work on the machine skews every wall-clock figure: 1-minute load before and after
            "load_average_1m": [round(self.load, 2), round(os.getloadavg()[0], 2)],
        }


def header(meta: dict[str, Any]) -> str:
    """The table's first line: the command, the machine and its load."""
    before, after = meta["load_average_1m"]
    return f"Command: `{meta['command']}` — {meta['machine']}; 1-min load average {before:g} before, {after:g} after"


def save(out: Path, name: str, results: dict[str, Any], table: str) -> None:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
