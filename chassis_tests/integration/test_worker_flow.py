"""What happens to a job: processed once, deduplicated, retried, dead-lettered, replayed.

The worker runs as a real subprocess (``python -m <package> run``) against a real nats-server;
its DEBUG 'job done' log lines are the accounting. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from worker_testkit import DURABLE, LANE, Record, WorkerEnv, WorkerProcess, wait_until

from {{ cookiecutter.__package_name }} import __version__

pytestmark = pytest.mark.integration


def retries_of(worker: WorkerProcess, job_id: str) -> list[int]:
    """Attempt numbers of the 'job failed, retry ...' lines about one job."""
    return [
        int(r["attempt"]) for r in worker.with_msg("job failed, retry") if r["job_id"] == job_id
    ]


def replay_done(worker: WorkerProcess, job_id: str) -> Record:
    """The 'job done' line of a replayed job (its log id may carry a ':replay:N' suffix)."""

    def matches(r: Record) -> bool:
        return r.get("msg") == "job done" and str(r.get("job_id")).split(":replay:")[0] == job_id

    return worker.wait_log(matches, 15, f"replayed {job_id} to be done")[0]


@pytest.mark.timeout(60)
def test_happy_path_every_job_processed_once(worker_env: WorkerEnv) -> None:
    env = worker_env
    env.provision()
    ids = [f"happy-{i:02d}" for i in range(30)]
    # JSON lines on stdin, then a JSON array as the argument: both CLI input forms.
    lines = "\n".join(json.dumps({"id": i, "item": "book", "quantity": 2}) for i in ids[:25])
    assert f"published 25 job(s) to {env.ingress}" in env.cli_ok("publish", input=lines)
    array = json.dumps([{"id": i} for i in ids[25:]])
    assert f"published 5 job(s) to {env.ingress}" in env.cli_ok("publish", array)
    assert env.stored() == 30

    worker = env.spawn(CONCURRENCY=8)
    counts = worker.wait_done(ids)
    assert counts == Counter(dict.fromkeys(ids, 1)), "each job exactly once, and nothing else"
    assert {r["attempt"] for r in worker.done()} == {1}
    assert all(r["stream_seq"] >= 1 for r in worker.done())
    env.wait_stored(0)  # work-queue retention: an acked job leaves the stream

    status = json.loads(env.cli_ok("status", "--json"))
    assert status["provisioned"] is True
    assert status["messages"] == 0
    assert status["current_lane"] == LANE
    [lane] = status["lanes"]
    assert (lane["lane"], lane["consumer"], lane["state"]) == (LANE, DURABLE, "current")
    assert (lane["pending"], lane["unacked"], lane["redelivered"]) == (0, 0, 0)
    assert status["dlq"] == {"stream": env.dlq_stream, "messages": 0}

    assert worker.stop() == 0
    [stopped] = worker.with_msg("stopped (SIGTERM)")
    assert "processed=30" in stopped["msg"]
    assert "dead_lettered=0" in stopped["msg"]
    assert not worker.non_json_lines(), "LOG_FORMAT=json: every stderr line is JSON"


@pytest.mark.timeout(60)
def test_status_shows_a_working_lanes_live_figures(worker_env: WorkerEnv) -> None:
    """``status --json`` while a lane works: jobs in flight, succeeded and failed over the recent
    window, p50/p95 handling time and a drain ETA for its backlog; the instance is running."""
    env = worker_env
    env.provision()
    worker = env.spawn(CONCURRENCY=2, HEARTBEAT_INTERVAL=0.5)
    quick = [f"live-q{i:02d}" for i in range(40)]
    env.cli_ok("publish", json.dumps([{"id": i, "work_seconds": 0.01} for i in quick]))
    worker.wait_done(quick)
    slow = [{"id": f"live-s{i}", "work_seconds": 3} for i in range(6)]
    env.cli_ok("publish", json.dumps(slow))

    def working() -> Record | None:
        status = json.loads(env.cli_ok("status", "--json"))
        [row] = status["lanes"]
        # (the prefetch holds a job or two more than the slots: pending is what is left)
        busy = row["in_flight"] == 2 and row["pending"] > 0 and row["drain_eta_s"]
        return {**row, "instances": status["instances"]} if busy else None

    row = wait_until(working, 15, "status to show two jobs in flight and a drain ETA")
    assert row["succeeded"] >= 40, row
    assert row["failed"] == 0, row
    assert row["rate_per_s"] > 0, row
    assert 0 < row["p50_ms"] <= row["p95_ms"], row
    assert row["drain_eta_s"] == round(row["pending"] / row["rate_per_s"], 1), row
    assert [i["state"] for i in row["instances"]] == ["running"], row["instances"]
    assert worker.stop() == 0


@pytest.mark.timeout(60)
def test_publishing_the_same_id_twice_stores_it_once(worker_env: WorkerEnv) -> None:
    env = worker_env
    env.provision()
    job = json.dumps({"id": "dup-1", "item": "pen"})
    assert "published 1 job(s)" in env.cli_ok("publish", job)
    again = env.cli_ok("publish", job)
    assert "published 0 job(s)" in again
    assert "1 duplicate(s) dropped by the stream" in again
    # The id is the key, not the body; duplicates inside one batch are dropped too.
    batch = json.dumps([{"id": "dup-1", "quantity": 5}, {"id": "dup-2"}, {"id": "dup-2"}])
    out = env.cli_ok("publish", batch)
    assert "published 1 job(s)" in out
    assert "2 duplicate(s)" in out
    # --raw with --msg-id deduplicates the same way.
    env.cli_ok("publish", "--raw", "opaque bytes", "--msg-id", "raw-dup")
    assert "1 duplicate(s)" in env.cli_ok("publish", "--raw", "other bytes", "--msg-id", "raw-dup")
    assert env.stored() == 3


@pytest.mark.timeout(60)
def test_retry_then_success(worker_env: WorkerEnv) -> None:
    env = worker_env
    worker = env.spawn(MAX_DELIVER=5)
    env.publish([{"id": "flaky-1", "fail_times": 2}])
    worker.wait_done(["flaky-1"])
    [done] = worker.done()
    assert done["attempt"] == 3
    assert retries_of(worker, "flaky-1") == [1, 2]
    env.wait_stored(0)
    assert env.stored(env.dlq_stream) == 0
    assert env.consumer_info().num_ack_pending == 0


@pytest.mark.timeout(60)
def test_exhausted_retries_go_to_the_dlq_with_their_story(worker_env: WorkerEnv) -> None:
    env = worker_env
    worker = env.spawn(MAX_DELIVER=3)
    before = datetime.now(UTC).replace(microsecond=0)
    [payload] = env.publish([{"id": "doomed-1", "item": "vase", "fail_times": 99}])
    env.wait_stored(1, env.dlq_stream)
    env.wait_stored(0)  # terminated in the work stream: not redelivered again

    [entry] = env.dlq_entries()
    assert entry.data == payload, "the DLQ keeps the original bytes"
    h = entry.headers or {}
    assert h["Dlq-Reason"] == "exhausted"
    assert h["Dlq-Deliveries"] == "3"
    assert h["Dlq-Error-Type"] == "Retry"
    assert "demo failure 3 of 99" in h["Dlq-Error"]
    assert re.fullmatch(env.stored_subject, h["Dlq-Subject"]), h["Dlq-Subject"]
    assert h["Dlq-Stream"] == env.stream
    assert h["Dlq-Sequence"] == "1"
    assert h["Dlq-Lane"] == LANE
    assert h["Dlq-Worker-Version"] == __version__
    assert h["Dlq-Msg-Id"] == "doomed-1"
    when = datetime.strptime(h["Dlq-Time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 0 <= (when - before).total_seconds() < 60

    assert retries_of(worker, "doomed-1") == [1, 2]
    [dead] = worker.with_msg("job dead-lettered")
    assert dead["job_id"] == "doomed-1"
    assert dead["attempt"] == 3
    assert worker.done() == []
    info = env.consumer_info()
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


@pytest.mark.timeout(60)
def test_invalid_payloads_are_dead_lettered_at_once(worker_env: WorkerEnv) -> None:
    env = worker_env
    worker = env.spawn(MAX_DELIVER=5)
    bad = {
        "bad-json": "this is not json",
        "bad-field": '{"id": "x", "quantity": 0}',
        "bad-extra": '{"id": "y", "surprise": true}',
    }
    for msg_id, payload in bad.items():
        env.cli_ok("publish", "--raw", payload, "--msg-id", msg_id)
    env.wait_stored(len(bad), env.dlq_stream)
    env.wait_stored(0)

    entries = {(e.headers or {})["Dlq-Msg-Id"]: e for e in env.dlq_entries()}
    assert set(entries) == set(bad)
    for msg_id, entry in entries.items():
        h = entry.headers or {}
        assert entry.data == bad[msg_id].encode()
        assert h["Dlq-Reason"] == "invalid"
        assert h["Dlq-Deliveries"] == "1", "an invalid job is never retried"
        assert h["Dlq-Error-Type"] == "ValidationError"
        assert "\n" not in h["Dlq-Error"]
    assert "quantity" in (entries["bad-field"].headers or {})["Dlq-Error"]
    assert "surprise" in (entries["bad-extra"].headers or {})["Dlq-Error"]
    assert worker.with_msg("job failed, retry") == []
    assert env.consumer_info().num_redelivered == 0

    env.publish([{"id": "good-after-bad"}])  # the worker is unharmed
    worker.wait_done(["good-after-bad"])


@pytest.mark.timeout(60)
def test_handler_timeout_is_a_failure_then_dead_letter(worker_env: WorkerEnv) -> None:
    env = worker_env
    worker = env.spawn(HANDLER_TIMEOUT=0.3, MAX_DELIVER=2, CONCURRENCY=1, FETCH_BATCH=1)
    started = time.monotonic()
    env.publish([{"id": "stuck-1", "work_seconds": 30}])
    env.wait_stored(1, env.dlq_stream)
    assert time.monotonic() - started < 10, "two 0.3 s timeouts, not two 30 s jobs"
    [entry] = env.dlq_entries()
    h = entry.headers or {}
    assert h["Dlq-Reason"] == "exhausted"
    assert h["Dlq-Deliveries"] == "2"
    assert h["Dlq-Error-Type"] == "HandlerTimeoutError"
    assert "0.3s" in h["Dlq-Error"]
    [retry] = worker.with_msg("job failed, retry")
    assert retry["attempt"] == 1
    assert "HandlerTimeoutError" in retry["msg"]

    # The only slot survived the cancellation: the next job still runs.
    env.publish([{"id": "after-timeout"}])
    worker.wait_done(["after-timeout"])
    assert worker.stop() == 0
    [stopped] = worker.with_msg("stopped (")
    assert "failed=2" in stopped["msg"]
    assert "dead_lettered=1" in stopped["msg"]
    assert "processed=1" in stopped["msg"]


@pytest.mark.timeout(90)
def test_dlq_list_replay_and_purge(worker_env: WorkerEnv) -> None:
    env = worker_env
    # MAX_DELIVER=1: a job that fails once is dead-lettered on its first delivery.
    first = env.spawn(name="strict", MAX_DELIVER=1)
    env.publish([{"id": "again-1", "fail_times": 1}, {"id": "again-2", "fail_times": 1}])
    env.cli_ok("publish", "--raw", "garbage", "--msg-id", "raw-1")
    env.wait_stored(3, env.dlq_stream)
    assert first.stop() == 0

    listing = json.loads(env.cli_ok("dlq", "list", "--json"))
    by_id = {e["msg_id"]: e for e in listing}
    assert set(by_id) == {"again-1", "again-2", "raw-1"}
    assert by_id["again-1"]["reason"] == "exhausted"
    assert by_id["again-1"]["deliveries"] == 1
    assert by_id["again-1"]["error_type"] == "Retry"
    assert by_id["raw-1"]["reason"] == "invalid"
    assert by_id["raw-1"]["size"] == len(b"garbage")
    assert [e["dlq_seq"] for e in listing] == sorted(e["dlq_seq"] for e in listing)
    assert len(json.loads(env.cli_ok("dlq", "list", "--json", "--limit", "1"))) == 1
    table = env.cli_ok("dlq", "list")
    assert "again-1" in table
    assert "invalid" in table

    # Refusals: one line, exit 65, nothing touched.
    for args in (["dlq", "replay"], ["dlq", "replay", "--seq", "99999"], ["dlq", "purge"]):
        refused = env.cli(*args)
        assert refused.returncode == 65, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert env.stored(env.dlq_stream) == 3

    # A worker that allows retries: provisioning raises the consumer's max_deliver.
    second = env.spawn(name="lenient", MAX_DELIVER=3)
    seq = by_id["again-1"]["dlq_seq"]
    assert "replayed 1 job(s)" in env.cli_ok("dlq", "replay", "--seq", str(seq))
    done = replay_done(second, "again-1")
    assert done["attempt"] == 2  # fail_times=1: the replay fails once, then succeeds
    left = json.loads(env.cli_ok("dlq", "list", "--json"))
    assert {e["msg_id"] for e in left} == {"again-2", "raw-1"}, "a replayed entry leaves the DLQ"

    assert "replayed 2 job(s)" in env.cli_ok("dlq", "replay", "--all")
    replay_done(second, "again-2")

    # The garbage is still garbage: it comes back as a new entry, tagged with its replay.
    def garbage_back() -> list[dict[str, object]]:
        entries: list[dict[str, object]] = json.loads(env.cli_ok("dlq", "list", "--json"))
        return entries if len(entries) == 1 and entries[0]["reason"] == "invalid" else []

    back = wait_until(garbage_back, 15, "the replayed garbage back in the DLQ", interval=0.2)
    assert str(back[0]["msg_id"]).startswith("raw-1")
    assert int(str(back[0]["dlq_seq"])) > max(e["dlq_seq"] for e in listing)

    assert "purged 1 DLQ entr" in env.cli_ok("dlq", "purge", "--yes")
    assert json.loads(env.cli_ok("dlq", "list", "--json")) == []
    assert "DLQ is empty" in env.cli_ok("dlq", "list")
    assert second.stop() == 0
    env.wait_stored(0)


@pytest.mark.timeout(60)
def test_long_job_keeps_its_lease_with_in_progress(worker_env: WorkerEnv) -> None:
    """ACK_WAIT=2 and a 5 s job: in_progress keeps it ours; never redelivered, done once."""
    env = worker_env
    worker = env.spawn(ACK_WAIT=2, CONCURRENCY=4)
    env.publish([{"id": "long-1", "work_seconds": 5}])
    worker.wait_done(["long-1"], timeout=20)
    [done] = worker.done()
    assert done["attempt"] == 1
    env.wait_stored(0)
    info = env.consumer_info()
    assert info.num_redelivered == 0
    assert info.config.ack_wait == 2
    assert worker.done_ids() == Counter({"long-1": 1})
