"""One miner in its own process, so its CPU time and memory are its own.

``python -m bench.serve --kind miner|thin|baseline --upstream URL --port P --workdir DIR`` builds the
miner on a mock chain of its own (MockSubtensor state is per process), serves a real axon on
127.0.0.1:P, writes ``{"pid", "port", "hotkey", "coldkey"}`` to ``DIR/<kind>.ready`` once it
listens, and serves until its stdin closes. The validators of the benchmark are not on that
chain, so non-registered hotkeys are served (``--blacklist.allow_non_registered``): the
blacklist and priority still run for every request, as they would for a registered validator.

:class:`BenchServer` is the benchmark's handle on it. Not the test kit's
:class:`~openai_miner.testing.process.MinerProcess`, which runs the ``openai-miner`` command: here
the miner, SN1's pattern (:mod:`bench.baseline`) and the pass-through are built alike, each in a
child of the same shape, so that a comparison measures the servers and nothing of how they start
(the command also logs at info level and freezes the collector).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import procstat
from openai_miner.testing.localnet import OPEN_TO_ALL, axon_info, free_port, miner_argv, offline_ip

KINDS = ("miner", "thin", "baseline")  # on the axon: this project's miner, a thin reference, SN1's pattern
HTTP_KINDS = ("http", "passthrough")  # over HTTP: the miner's HTTP front and a thin pass-through


def build(kind: str, upstream: str, port: int, workdir: Path, batch_size: int):
    from openai_miner.miner import OpenAIMiner

    if kind == "baseline":
        from bench.baseline import BaselineMiner as cls
    elif kind == "thin":
        from bench.thin import ThinMiner as cls
    else:
        cls = OpenAIMiner
    front = ["--axon.off", "--http.port", str(port)] if kind == "http" else []
    argv = miner_argv(
        workdir / "wallets", port, "--openai.base_url", upstream, "--openai.model_name", "loopback",
        "--fallback.off", *OPEN_TO_ALL, "--neuron.streaming_batch_size", str(batch_size), *front, name=kind,
    )
    return cls(cls.config(argv, env={}), api_key="test")


def serve_passthrough(upstream: str, port: int, workdir: Path) -> None:
    import uvicorn

    from bench.passthrough import app
    from openai_miner.serving import Servers

    servers = Servers([uvicorn.Server(uvicorn.Config(app(upstream), host="127.0.0.1", port=port, log_level="warning"))])
    servers.start()
    wait_listening(port)
    announce("passthrough", {"pid": os.getpid(), "port": port, "hotkey": "", "coldkey": ""}, workdir)
    sys.stdin.read()
    servers.stop(1.0)
    os._exit(0)


def wait_listening(port: int) -> None:
    from openai_miner.startup import wait_port

    if not wait_port(port, listening=True, timeout=30.0):
        raise SystemExit(f"nothing listens on port {port}")


def announce(kind: str, ready: dict, workdir: Path) -> None:
    partial = workdir / f"{kind}.ready.tmp"
    partial.write_text(json.dumps(ready))
    partial.rename(workdir / f"{kind}.ready")


def serve(kind: str, upstream: str, port: int, workdir: Path, batch_size: int) -> None:
    with offline_ip():  # never ask the internet who we are
        miner = build(kind, upstream, port, workdir, batch_size)
        miner.run_in_background_thread()
    ready = {
        "pid": os.getpid(),
        "port": port,
        "hotkey": miner.wallet.hotkey.ss58_address,
        "coldkey": miner.wallet.coldkeypub.ss58_address,
    }
    announce(kind, ready, workdir)
    sys.stdin.read()  # until the benchmark closes the pipe (or dies)
    miner.stop_run_thread()
    os._exit(0)  # the axon's uvicorn thread does not stop by itself


class BenchServer:
    """Starts ``python -m bench.serve`` and reads its CPU time and memory from ``/proc``."""

    def __init__(self, kind: str, upstream: str, workdir: Path, batch_size: int) -> None:
        self.start(kind, workdir, [
            "bench.serve", "--kind", kind, "--upstream", upstream, "--workdir", str(workdir),
            "--batch-size", str(batch_size),
        ])

    def start(self, kind: str, workdir: Path, module_args: list[str]) -> None:
        """Run ``python -m MODULE ARGS --port PORT`` on a free port, in ``workdir``, without the
        user's OpenAI settings; it writes ``KIND.ready`` once it serves."""
        self.kind, self.port, self.info = kind, free_port(), {}
        root = Path(__file__).resolve().parent.parent
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
            "HOME": str(workdir),  # bittensor writes ~/.bittensor on import
        }
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
            env.pop(name, None)
        self._ready = workdir / f"{kind}.ready"
        self._ready.unlink(missing_ok=True)
        self.log = workdir / f"{kind}.log"
        self._log = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *module_args, "--port", str(self.port)],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._ready.exists():
                self.info = json.loads(self._ready.read_text())
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        tail = self.log.read_text()[-3000:]
        raise RuntimeError(f"the {self.kind} miner did not start within {timeout:g}s:\n{tail}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def axon_info(self):
        return axon_info(self.port, self.info["hotkey"], self.info["coldkey"])

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def memory_mb(self) -> dict[str, float]:
        return procstat.memory_mb(self.pid)

    def reset_peak(self) -> bool:
        return procstat.reset_peak(self.pid)

    def stop(self) -> None:
        procstat.stop(self.process)
        self._log.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS + HTTP_KINDS, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the OpenAI-compatible upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=12)
    args = parser.parse_args()
    if not args.upstream.startswith("http://127.0.0.1:"):
        parser.error("the benchmark only talks to 127.0.0.1")
    if args.kind == "passthrough":
        serve_passthrough(args.upstream, args.port, args.workdir)
    else:
        serve(args.kind, args.upstream, args.port, args.workdir, args.batch_size)


if __name__ == "__main__":
    main()
