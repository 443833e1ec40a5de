"""Broker-side faults. The broker goes away in the middle of a stream of jobs and comes back
with the same store: the worker reconnects by itself and no job is lost (delivery is
at-least-once, so a job whose ack died with the connection may run twice: duplicates are
reported, losses fail the test). A SIGTERM during an outage is still a clean stop, and a pull
request the server refuses (consumer deleted) is retried with a pause, not in a busy loop."""

from __future__ import annotations

import signal
import time

import pytest
from nats.js import JetStreamContext
from worker_testkit import DURABLE, NatsServer, WorkerEnv, cpu_seconds

pytestmark = pytest.mark.integration

JOBS = 500


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_no_job_is_lost_across_a_broker_restart(
    restartable_server: NatsServer, worker_env: WorkerEnv, how: str
) -> None:
    env = worker_env
    server = restartable_server
    env.set("NATS_URL", server.url)
    # ACK_WAIT=2: a job whose ack was lost in the outage comes back quickly.
    worker = env.spawn(CONCURRENCY=10, ACK_WAIT=2, MAX_DELIVER=10)
    ids = [f"restart-{i:03d}" for i in range(JOBS)]
    env.publish([{"id": i, "work_seconds": 0.05} for i in ids])

    worker.wait_log(lambda r: r.get("msg") == "job done", 30, "100 jobs done", count=100)
    if how == "kill":
        server.kill()  # SIGKILL: no goodbye to the clients
    else:
        server.stop()  # SIGTERM: a graceful broker shutdown
    done_during_outage = len(worker.done())
    server.start()  # same port, same store: streams and consumer state come back

    counts = worker.wait_done(ids, timeout=60)
    lost = set(ids) - set(counts)
    duplicates = {job: n for job, n in counts.items() if n > 1}
    print(
        f"broker {how}: {JOBS} jobs, {done_during_outage} done before the restart, "
        f"lost={len(lost)} duplicates={len(duplicates)} {sorted(duplicates)[:10]}"
    )
    assert not lost
    assert done_during_outage < JOBS, "the restart must happen mid-stream"
    assert set(counts) == set(ids), "nothing but the published jobs"
    env.wait_stored(0, timeout=30)  # every job acked in the end
    assert env.stored(env.dlq_stream) == 0
    assert worker.with_msg("disconnected from NATS")
    assert worker.with_msg("reconnected to NATS")
    assert worker.stop() == 0


@pytest.mark.timeout(90)
def test_sigterm_during_a_broker_outage_is_a_clean_stop(
    restartable_server: NatsServer, worker_env: WorkerEnv
) -> None:
    """Was a chassis bug: nats-py's close() raised into the dead socket and run() exited 1."""
    env = worker_env
    server = restartable_server
    env.set("NATS_URL", server.url)
    a = env.spawn(name="a", DRAIN_TIMEOUT=10, ACK_WAIT=2)
    env.publish([{"id": "outage-1", "work_seconds": 1}])
    env.wait_unacked(1)
    server.stop()
    a.send_signal(signal.SIGTERM)
    code = a.wait_exit(30)

    # Nothing is lost either way: the ack died with the connection, so the job comes back.
    server.start()
    b = env.spawn(name="b", ACK_WAIT=2)
    b.wait_done(["outage-1"], timeout=20)
    assert b.stop() == 0

    crashed = [r for r in a.records() if "exc" in r or r.get("level") == "error"]
    assert not crashed, crashed[0].get("exc", crashed[0])
    assert a.with_msg("stopped (SIGTERM)"), a.tail()
    assert code == 0, a.tail()


@pytest.mark.timeout(60)
def test_a_refused_pull_request_does_not_make_the_puller_spin(worker_env: WorkerEnv) -> None:
    """Was a chassis bug: with the consumer deleted (and PROVISION=false, so nothing re-creates
    it) every pull ended at once with 409/503 and was re-issued at once: a busy loop."""
    env = worker_env
    env.provision()
    worker = env.spawn(PROVISION="false")

    async def delete_consumer(js: JetStreamContext) -> None:
        await js.delete_consumer(env.stream, DURABLE)

    env.js(delete_consumer)
    worker.wait_msg("pull request refused", timeout=10)  # the worker noticed
    # A measurement window, not synchronisation: how many refusals, how much CPU in 2 s?
    window = 2.0
    before = len(worker.with_msg("pull request refused"))
    cpu_before = cpu_seconds(worker.pid)
    time.sleep(window)
    cpu_after = cpu_seconds(worker.pid)
    refusals = len(worker.with_msg("pull request refused")) - before
    assert worker.proc is not None
    assert worker.proc.poll() is None
    assert refusals < 20, f"{refusals} refused pull requests logged in {window:g}s: a busy loop"
    if cpu_before is not None and cpu_after is not None:  # Linux: the log could be throttled
        used = cpu_after - cpu_before
        assert used < 0.5 * window, f"{used:.2f}s of CPU in {window:g}s: a busy loop"

    # And it recovers once an operator provisions the consumer again.
    env.provision()
    env.publish([{"id": "after-recreate"}])
    worker.wait_done(["after-recreate"], timeout=30)
