"""A client that nats-py gives up on is never a zombie: the worker exits for its supervisor.

nats-py closes a client for good on any ``-ERR`` from the server other than 'Stale Connection'
and 'Permissions Violation', and it retries forever when every reconnect is refused for the
credentials. Either way the process used to stay up, logging ``pull request failed`` twice a
second, with ``/livez`` green, so nothing restarted it. Both causes are produced here by a real
nats-server of the test's own:

* a server restarted with ``max_subscriptions`` below what the worker holds: on reconnect the
  server answers ``-ERR 'Maximum Subscriptions Exceeded'`` (and keeps the connection), and
  nats-py closes the client for good. Same path as the issue's 'Maximum Payload Violation'.
* a config reload that removes the worker's user: the server drops the connection, and every
  reconnect gets 'Authorization Violation'.

Each time: ``/livez`` fails before the process exits, the exit code is the documented one (69,
77 for credentials), one error line names the cause, and the job the worker held is not lost:
it is redelivered to a fresh worker. A 'Permissions Violation' is not a close (nats-py keeps
the connection): the worker stays up and ``/livez`` fails once the pull loop is silent.

Not produced here: an expired user JWT (operator mode) ends like the 'Authorization Violation'
cases; a server-side slow-consumer close is a plain disconnect (the broker-restart tests cover
reconnecting); nats-py's own slow-consumer handling drops messages without closing anything.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from worker_testkit import (
    Record,
    WorkerEnv,
    WorkerProcess,
    free_port,
    http_status,
    port_open,
    wait_until,
)

from {{ cookiecutter.__package_name }}.runtime.operate.embedded import find_binary, stop_process

pytestmark = pytest.mark.integration

ACK_WAIT = 5  # a lost job comes back quickly; running handlers get at most 2/3 of it
WORK_SECONDS = 6  # the held job outlives the connection, so /livez is seen failing before exit


class ConfServer:
    """``nats-server -c FILE`` with JetStream on loopback; ``body`` can change between starts
    (``restart``) or while running (``reload``, the server's SIGHUP)."""

    def __init__(self, workdir: Path, body: str) -> None:
        self.workdir = workdir
        self.body = body
        self.port = free_port()
        self.conf = workdir / "nats-server.conf"
        self.log_path = workdir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, userinfo: str = "") -> str:
        return f"nats://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def _write(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        store = json.dumps(str(self.workdir / "store"))
        jetstream = "jetstream { store_dir: " + store + " }"
        self.conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n{jetstream}\n{self.body}\n", encoding="utf-8"
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> ConfServer:
        self._write()
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(self.conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        proc = self.proc
        ready_lines = self.log().count("Server is ready")

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nats-server exited {proc.returncode}:\n{self.log()}")
            return port_open(self.port) and self.log().count("Server is ready") > ready_lines

        wait_until(up, 15, f"nats-server on {self.port}", details=self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
            self.proc = None

    def restart(self, body: str) -> None:
        self.stop()
        self.body = body
        self.start()

    def reload(self, body: str) -> None:
        assert self.proc is not None
        done = self.log().count("Reloaded server configuration")
        self.body = body
        self._write()
        self.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.log().count("Reloaded server configuration") > done,
            15,
            "the configuration reload",
            details=self.log,
        )


@pytest.fixture
def conf_server(tmp_path: Path) -> Iterator[Callable[[str], ConfServer]]:
    servers: list[ConfServer] = []

    def make(body: str) -> ConfServer:
        servers.append(ConfServer(tmp_path / f"server-{len(servers)}", body).start())
        return servers[-1]

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


def livez_fails_before_exit(worker: WorkerProcess, timeout: float) -> None:
    url = f"http://127.0.0.1:{worker.health_port}/livez"

    def failing() -> bool:
        status = http_status(url, timeout=0.5)
        if status == 503:
            return True
        assert worker.proc is not None
        if worker.proc.poll() is not None:
            raise AssertionError(f"exited ({worker.proc.returncode}) before /livez failed")
        return False

    wait_until(failing, timeout, "/livez to fail", details=worker.tail)


def the_error_line(worker: WorkerProcess) -> Record:
    """Exactly one error line, and nothing after it that looks like a zombie's retry loop."""
    records = worker.records()
    errors = [r for r in records if r.get("level") == "error"]
    assert len(errors) == 1, f"one error line, got {len(errors)}:\n{worker.tail()}"
    after = records[records.index(errors[0]) :]
    assert not [r for r in after if "pull request failed" in str(r.get("msg"))], worker.tail()
    assert not worker.non_json_lines(), worker.non_json_lines()  # no traceback
    return errors[0]


def spawn_holding_a_job(env: WorkerEnv, nats_url: str, connect_timeout: float = 5) -> WorkerProcess:
    worker = env.spawn(
        name="a",
        NATS_URL=nats_url,
        NATS_CONNECT_TIMEOUT=connect_timeout,
        HEALTH_PORT=free_port(),
        HEALTH_HOST="127.0.0.1",
        ACK_WAIT=ACK_WAIT,
    )
    env.publish([{"id": "held-1", "work_seconds": WORK_SECONDS}])
    env.wait_unacked(1)
    return worker


def nothing_lost(env: WorkerEnv, nats_url: str) -> None:
    """A fresh worker gets the held job once JetStream redelivers it, and the stream empties."""
    b = env.spawn(name="b", NATS_URL=nats_url, ACK_WAIT=ACK_WAIT)
    b.wait_done(["held-1"], timeout=ACK_WAIT + WORK_SECONDS + 15)
    env.wait_stored(0, timeout=15)
    assert env.stored(env.dlq_stream) == 0
    assert b.stop() == 0


@pytest.mark.timeout(120)
def test_a_client_closed_for_good_by_nats_py_exits_69_and_loses_nothing(
    worker_env: WorkerEnv, conf_server: Callable[[str], ConfServer]
) -> None:
    env = worker_env
    server = conf_server("max_subscriptions: 1000")
    env.set("NATS_URL", server.url())
    a = spawn_holding_a_job(env, server.url())

    # The worker holds about 14 subscriptions; it resubscribes to all of them on reconnect.
    server.restart("max_subscriptions: 5")
    restarted = time.monotonic()
    livez_fails_before_exit(a, timeout=15)
    code = a.wait_exit(20)
    took = time.monotonic() - restarted
    line = the_error_line(a)
    print(f"exit {code} {took:.1f}s after the restart: {line['msg']}")
    assert code == 69, a.tail()
    assert "maximum subscriptions exceeded" in line["msg"].lower()
    assert "closed the connection for good" in line["msg"]
    # Bounded: the running handler may use at most ACK_WAIT - ACK_WAIT/3 after the disconnect.
    assert took < ACK_WAIT + 5, f"took {took:.1f}s"

    server.restart("max_subscriptions: 1000")
    nothing_lost(env, server.url())


@pytest.mark.timeout(120)
def test_credentials_refused_on_every_reconnect_exit_77_and_lose_nothing(
    worker_env: WorkerEnv, conf_server: Callable[[str], ConfServer]
) -> None:
    env = worker_env
    users = '{user: admin, password: "admin-pw"}, {user: %s, password: "%s-pw"}'
    server = conf_server("authorization { users = [ %s ] }" % (users % ("worker", "worker")))
    env.set("NATS_URL", server.url("admin:admin-pw"))  # the test's own connections
    refusal_window = 2  # NATS_CONNECT_TIMEOUT: how long refusals may last before the exit
    a = spawn_holding_a_job(env, server.url("worker:worker-pw"), refusal_window)

    # The worker's user is revoked (rotated to another name) while it runs.
    server.reload("authorization { users = [ %s ] }" % (users % ("successor", "successor")))
    revoked = time.monotonic()
    livez_fails_before_exit(a, timeout=15)
    code = a.wait_exit(20)
    took = time.monotonic() - revoked
    line = the_error_line(a)
    print(f"exit {code} {took:.1f}s after the revocation: {line['msg']}")
    assert code == 77, a.tail()
    assert "Authorization Violation" in line["msg"]
    assert "NATS_USER" in line["msg"]
    assert took < refusal_window + ACK_WAIT + 5, f"took {took:.1f}s"

    nothing_lost(env, server.url("successor:successor-pw"))


@pytest.mark.timeout(90)
def test_a_permissions_violation_keeps_the_connection_and_fails_livez(
    worker_env: WorkerEnv, conf_server: Callable[[str], ConfServer]
) -> None:
    """Not a close: nats-py only reports 'Permissions Violation'. Here the server withdraws the
    worker's inbox subscriptions (reloaded permissions), so no delivery or pull heartbeat can
    reach it: the process stays up and connected, and ``/livez`` fails after LIVENESS_STALL,
    which is what gets it restarted."""
    env = worker_env
    user = '{user: worker, password: "worker-pw"%s}'
    server = conf_server("authorization { users = [ %s ] }" % (user % ""))
    env.set("NATS_URL", server.url("worker:worker-pw"))
    stall = 3
    a = env.spawn(name="a", HEALTH_PORT=free_port(), HEALTH_HOST="127.0.0.1", LIVENESS_STALL=stall)
    livez = f"http://127.0.0.1:{a.health_port}/livez"
    assert http_status(livez) == 200

    deny = ', permissions: { subscribe: { deny: "_INBOX.>" } }'
    server.reload("authorization { users = [ %s ] }" % (user % deny))
    revoked = time.monotonic()
    wait_until(lambda: http_status(livez) == 503, stall + 10, "/livez to fail", details=a.tail)
    took = time.monotonic() - revoked
    assert a.proc is not None
    assert a.proc.poll() is None, "a permissions violation is not fatal"
    assert a.with_msg("nats error: nats: permissions violation"), a.tail()
    assert took >= stall - 1.5, f"/livez failed {took:.1f}s after the revocation"
    assert a.stop() == 0
