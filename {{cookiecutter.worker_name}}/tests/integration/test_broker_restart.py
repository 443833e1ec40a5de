"""The broker goes away in the middle of a stream of jobs and comes back with the same store:
the worker reconnects by itself and no job is lost. Delivery is at-least-once, so a job whose
ack died with the connection may run twice: duplicates are reported, losses fail the test."""

from __future__ import annotations

import pytest
from worker_testkit import NatsServer, WorkerEnv

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
