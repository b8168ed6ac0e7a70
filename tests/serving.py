"""`convirt serve` as a child process on loopback: for the tests and the server benchmarks (which
reach it through bench/common.py). Test harness only: nothing the package ships imports it.

with ServerProcess({"CONVIRT_MODEL": bundle, "CONVIRT_INDEX_ROOT": root}) as server:
    httpx.get(server.url + "/readyz")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """A real uvicorn process serving `convirt serve`; waits for /readyz, stops with SIGTERM."""

    def __init__(self, settings: Mapping[str, str], ready_timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.env = {
            **os.environ,
            **{k: str(v) for k, v in settings.items()},
            "CONVIRT_HOST": LOOPBACK,
            "CONVIRT_PORT": str(self.port),
        }
        self.ready_timeout = ready_timeout
        handle, name = tempfile.mkstemp(prefix="convirt-serve-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def start(self) -> None:
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "convirt.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"server exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"server not ready in {self.ready_timeout:.0f}s:\n{self.output()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peak_rss_bytes(self) -> int | None:
        """The server's peak resident set size so far (Linux: VmHWM), or None elsewhere."""
        return self._memory("VmHWM")

    def rss_bytes(self) -> int | None:
        """The server's resident set size now (Linux: VmRSS), or None elsewhere."""
        return self._memory("VmRSS")

    def _memory(self, field: str) -> int | None:
        if self.process is None:
            return None
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        return None


def finish(process: ServerProcess, started: Future) -> None:
    """Stop a server whose start ran in a pool (`started`); one that started must stop cleanly
    and have logged no traceback."""
    try:
        if started.exception() is None:
            # uvicorn shuts down gracefully on SIGTERM, then exits by re-raising it
            assert process.stop() in (0, -signal.SIGTERM), process.output()
            assert "Traceback" not in process.output(), process.output()
    finally:
        process.__exit__()
