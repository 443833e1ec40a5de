"""The operator's side: bad configuration fails fast with one line and a documented exit code,
provisioning is idempotent and converges, health probes follow the worker's lifecycle."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from worker_testkit import DURABLE, LANE, WorkerEnv, free_port, http_status, wait_until

pytestmark = pytest.mark.integration

SECRET = "pa55-Word-7c1e"  # noqa: S105 - a fake secret the test looks for


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The contract for operator errors: that exit code, one stderr line, no traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    return lines[0]


@pytest.mark.timeout(30)
def test_concurrency_zero_exits_78_naming_the_variable(worker_env: WorkerEnv) -> None:
    result = worker_env.cli("run", CONCURRENCY=0)
    line = one_line_error(result, 78)
    assert "CONCURRENCY" in line
    assert result.stdout == ""


@pytest.mark.timeout(30)
def test_missing_creds_file_exits_78(worker_env: WorkerEnv, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "worker.creds"
    line = one_line_error(worker_env.cli("run", NATS_CREDS=missing), 78)
    assert "NATS_CREDS" in line
    assert str(missing) in line


@pytest.mark.timeout(30)
def test_health_port_in_use_exits_78(worker_env: WorkerEnv) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = worker_env.cli("run", HEALTH_PORT=port, HEALTH_HOST="127.0.0.1")
    assert "HEALTH_PORT" in one_line_error(result, 78)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", [["run"], ["status"], ["publish", '{"id": "x"}']])
def test_config_errors_never_print_secrets(worker_env: WorkerEnv, command: list[str]) -> None:
    result = worker_env.run_cli(command, env={"NATS_PASSWORD": SECRET})
    line = one_line_error(result, 78)
    assert "NATS_PASSWORD" in line
    assert SECRET not in result.stderr + result.stdout
    bad_url = worker_env.run_cli(command, env={"NATS_URL": f"nats://bob:{SECRET}@:4222"})
    assert "NATS_URL" in one_line_error(bad_url, 78)
    assert SECRET not in bad_url.stderr + bad_url.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["publish", "not json"], None, "not JSON"),
        (["publish", '{"quantity": 2}'], None, "id"),
        (["publish", '[{"id": "a"}, {"id": "b", "quantity": 0}]'], None, "job 2"),
        (["publish"], "", "no job given"),
    ],
)
def test_bad_publish_input_exits_65(
    worker_env: WorkerEnv, args: list[str], stdin: str | None, needle: str
) -> None:
    line = one_line_error(worker_env.run_cli(args, input=stdin), 65)
    assert needle in line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", [["run"], ["status"]])
def test_a_nats_host_that_does_not_exist_exits_78_at_once(
    worker_env: WorkerEnv, command: list[str]
) -> None:
    """``NATS_URL=nonsense``: DNS says there is no such name, which no wait can change. One line
    naming NATS_URL and exit 78, well before NATS_CONNECT_TIMEOUT (was: 69 after the timeout)."""
    try:
        socket.getaddrinfo("nonsense", 4222)
    except socket.gaierror as exc:
        if exc.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            pytest.skip(f"this machine's resolver cannot say whether 'nonsense' exists: {exc}")
    else:
        pytest.skip("'nonsense' resolves on this machine (a DNS search domain with a wildcard?)")
    started = time.monotonic()
    env = {"NATS_URL": "nonsense", "NATS_CONNECT_TIMEOUT": 20, "LOG_LEVEL": "INFO"}
    result = worker_env.run_cli(command, env=env)
    took = time.monotonic() - started
    line = one_line_error(result, 78)
    assert "NATS_URL" in line
    assert "'nonsense'" in line
    assert took < 6, f"took {took:.1f}s: a name that does not exist must not wait for the timeout"


@pytest.mark.timeout(60)
def test_rollback_without_an_earlier_lane_exits_75(worker_env: WorkerEnv) -> None:
    """A refused route change, like a switch to a lane nobody serves (was: exit 1, the code for a
    bug). Nothing changes."""
    worker_env.provision()
    before = worker_env.cli_ok("route", "--json")
    line = one_line_error(worker_env.cli("route", "--rollback"), 75)
    assert "nothing to roll back to" in line
    assert worker_env.cli_ok("route", "--json") == before


@pytest.mark.timeout(30)
def test_publish_before_provision_is_one_line_not_a_traceback(worker_env: WorkerEnv) -> None:
    result = worker_env.cli("publish", '{"id": "early"}')
    line = one_line_error(result, 69)
    assert "provision" in line


@pytest.mark.timeout(60)
def test_provision_is_idempotent_and_updates_the_consumer(worker_env: WorkerEnv) -> None:
    env = worker_env
    first = env.provision().splitlines()
    assert f"created stream {env.stream}" in first
    assert f"created stream {env.dlq_stream}" in first
    assert f"created consumer {DURABLE}" in first
    assert any(line.startswith(f"route: new work -> {LANE} 100%") for line in first), first

    second = env.provision().splitlines()
    assert f"unchanged stream {env.stream}" in second
    assert f"unchanged stream {env.dlq_stream}" in second
    assert f"unchanged consumer {DURABLE}" in second
    assert not [x for x in second if x.startswith(("created", "updated"))], second

    third = env.provision(ACK_WAIT=7).splitlines()
    [updated] = [x for x in third if x.startswith("updated")]
    assert updated.startswith(f"updated consumer {DURABLE}")
    assert "ack_wait" in updated
    assert f"unchanged stream {env.stream}" in third
    assert env.consumer_info().config.ack_wait == 7

    fourth = env.provision(ACK_WAIT=7).splitlines()
    assert f"unchanged consumer {DURABLE}" in fourth
    assert not [x for x in fourth if x.startswith(("created", "updated"))], fourth


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "value", "thing"),
    [("DUPLICATE_WINDOW", "33.3", "stream"), ("ACK_WAIT", "2.01", "consumer")],
)
def test_provision_converges_with_fractional_durations(
    worker_env: WorkerEnv, name: str, value: str, thing: str
) -> None:
    """Was a chassis bug: the server keeps whole nanoseconds and nats-py truncates (33.3 s reads
    back as 33.299999999 s), so an exact float comparison saw a change on every start."""
    env = worker_env
    env.provision(**{name: value})
    again = env.provision(**{name: value}).splitlines()
    changed = [line for line in again if line.startswith(("created", "updated"))]
    assert not changed, f"{name}={value} provisioned twice still changes the {thing}: {changed}"


@pytest.mark.timeout(60)
def test_health_probes_follow_the_lifecycle(worker_env: WorkerEnv) -> None:
    env = worker_env
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    livez = f"http://127.0.0.1:{port}/livez"
    worker = env.spawn(HEALTH_PORT=port, DRAIN_TIMEOUT=20)  # ready = /readyz answers 200
    probe = env.cli("health", HEALTH_PORT=port)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.startswith("/readyz: ok")
    assert env.cli("health", "--live", HEALTH_PORT=port).returncode == 0
    assert http_status(f"http://127.0.0.1:{port}/nope") == 404

    env.publish([{"id": "probe-1", "work_seconds": 2}])
    env.wait_unacked(1)
    worker.send_signal(signal.SIGTERM)
    # Draining: not ready (take me out of the load balancer), but alive (do not kill me).
    wait_until(lambda: http_status(readyz) == 503, 5, "/readyz to fail while draining")
    assert http_status(livez) == 200
    assert worker.wait_exit(20) == 0
    assert worker.done_ids()["probe-1"] == 1
    started = time.monotonic()
    gone = env.cli("health", "--timeout", "1", HEALTH_PORT=port)
    assert gone.returncode == 1
    assert "FAIL" in gone.stdout
    assert time.monotonic() - started < 10
