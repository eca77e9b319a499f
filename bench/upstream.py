"""The upstream in its own process: the loopback OpenAI-compatible server, driven over a pipe.

``python -m bench.upstream`` serves :class:`openai_miner.testing.upstream.LoopbackUpstream` on 127.0.0.1,
prints its base URL, then answers one JSON command per stdin line with one JSON line on stdout:

* ``{"cmd": "configure", "tokens": N, "interval": S}``: later answers are ``N`` words ``w0 `` ...
  ``w{N-1} `` written ``S`` seconds apart (``S`` = 0: as fast as the socket takes them);
* ``{"cmd": "dump"}``: what every request since the last dump saw, keyed by the ``bench-...``
  marker in its prompt: ``received_at`` and ``token_times`` (``time.monotonic()``, the same
  CLOCK_MONOTONIC as every other process here), ``finished``.

It ends at EOF on stdin. :class:`UpstreamProcess` is the benchmark's handle on it.
"""

import argparse
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procstat

MARKER = re.compile(r"bench-[A-Za-z0-9_.-]+")


def words(count: int) -> list[str]:
    """The answer: numbered words, each ending in a space, so a chunk's tokens can be counted."""
    return [f"w{index} " for index in range(count)]


def marker_of(body: dict[str, Any]) -> str | None:
    found = MARKER.search(json.dumps(body.get("messages", [])))
    return found.group(0) if found else None


def serve(tokens: int, interval: float) -> None:
    from openai_miner.testing.upstream import LoopbackUpstream

    upstream = LoopbackUpstream(tokens=words(tokens), interval=interval, host="127.0.0.1").start()
    reply({"base_url": upstream.base_url})
    try:
        for line in sys.stdin:  # one command per line until the benchmark closes the pipe
            command = json.loads(line)
            if command["cmd"] == "configure":
                upstream.tokens = words(int(command["tokens"]))
                upstream.interval = float(command["interval"])
                reply({"ok": True})
            elif command["cmd"] == "dump":
                end = time.monotonic() + 5.0  # a handler may still be writing [DONE]
                while time.monotonic() < end and any(r.ended_at is None for r in upstream.requests):
                    time.sleep(0.005)
                records, upstream.requests = upstream.requests, []
                reply({"requests": [
                    {
                        "marker": marker_of(record.body),
                        "received_at": record.received_at,
                        "token_times": record.token_times,
                        "finished": record.finished,
                    }
                    for record in records
                ]})
            else:
                reply({"error": f"unknown command {command['cmd']!r}"})
    finally:
        upstream.stop()


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class UpstreamProcess:
    """Starts ``python -m bench.upstream`` and talks to it; stop it with :meth:`stop`."""

    def __init__(self, tokens: int, interval: float, log: Path) -> None:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--tokens", str(tokens), "--interval", str(interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )
        self.base_url: str = self._read(timeout=30.0)["base_url"]
        if not self.base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"upstream is not on 127.0.0.1: {self.base_url}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def configure(self, tokens: int, interval: float) -> None:
        self._call({"cmd": "configure", "tokens": tokens, "interval": interval})

    def dump(self) -> dict[str, dict[str, Any]]:
        """Requests since the last dump, by marker."""
        requests = self._call({"cmd": "dump"}, timeout=30.0)["requests"]
        return {record["marker"]: record for record in requests if record["marker"]}

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def stop(self) -> None:
        procstat.stop(self.process)
        self._log.close()

    def _call(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"upstream: {answer['error']}")
        return answer

    def _read(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the upstream did not answer within {timeout:g}s (see {self._log.name})")
        return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--interval", type=float, default=0.005)
    args = parser.parse_args()
    serve(args.tokens, args.interval)


if __name__ == "__main__":
    main()
