"""A real `mlflow server` on 127.0.0.1 for tests.

- `MlflowServer(tmp_dir)`: start()/stop()/kill()/pause() a server on a fixed free port
  with a SQLite store in tmp_dir; start() again reuses port and database.
- `running_mlflow_server(tmp_dir)`: context manager yielding the URI.
- `mlflow_server`: session-scoped pytest fixture yielding the URI; import it
  into a conftest.py or a test module (`from tests.mlflow_server import mlflow_server`).

The server runs in its own process group (start_new_session), so stopping it
by that group's id also ends its uvicorn worker and nothing else.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_exe() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")  # the venv's console script
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        cmd = _mlflow_exe() + [
            "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]
        # The job runner (huey consumers) is not needed and costs CPU on small machines.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{tail}")
            if self.healthy():
                return self.uri
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server at {self.uri} not healthy after {timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _signal(self, sig: int, wait: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # our own group: the server and its uvicorn child
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The uvicorn child may outlive the parent by a moment; wait for the port to close.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.healthy():
            time.sleep(0.1)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, wait=10)

    def kill(self) -> None:
        """A crash, not a shutdown."""
        self._signal(signal.SIGKILL, wait=10)

    def pause(self, paused: bool = True) -> None:
        """A hung server: connections are accepted but never answered (SIGSTOP/SIGCONT)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


@contextlib.contextmanager
def running_mlflow_server(tmp_path: Path) -> Iterator[str]:
    server = MlflowServer(Path(tmp_path))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri
