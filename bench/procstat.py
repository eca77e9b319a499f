"""The bench's processes and machine: CPU time and memory read from ``/proc`` (Linux only, no psutil), stopping them."""

import os
import platform
import subprocess
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of stat(5)


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """``rss``: resident set now, ``peak``: its high-water mark (VmHWM), both in MB (2**20 bytes)."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values["rss" if name == "VmRSS" else "peak"] = int(rest.split()[0]) / 1024  # kB
    return values


def reset_peak(pid: int | str) -> bool:
    """Reset ``pid``'s VmHWM to its current RSS (``clear_refs`` 5); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def stop(process: "subprocess.Popen[str]") -> None:
    """End a bench child: close its stdin (its signal to exit) if it has one, then terminate, then kill."""
    if process.stdin is not None and process.poll() is None:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for escalate in (process.terminate, process.kill):
        if process.poll() is not None:
            return
        escalate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def machine() -> str:
    """Cores, CPU model and Python version: what the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores{', ' + model if model else ''}, Python {platform.python_version()}"
