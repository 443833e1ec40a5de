"""Pipelines: a handler hands work on to another worker with ``ctx.publish``.

Two deployments on one real nats-server share a subject root with different job types: A (this
test's ``worker_env``, the worker's own job type) and B (job type ``notification``, or
``receipt`` when that is A's, and its own stream). A runs the demo app with
``DEMO_FORWARD_TO=<B's job type>``: on every try, before it may fail, its handler publishes one
job to B, with a fresh random id each time. What must hold:

* each upstream job creates exactly one downstream job, even when it ran twice (a retry): the
  derived ``Nats-Msg-Id`` (``<upstream id>:<target ingress>:<n>``) is what the stream dedups;
* the downstream job carries the upstream's trace: its ``traceparent`` as is with telemetry off,
  and a PRODUCER span in the upstream trace with telemetry on (B's CONSUMER span joins it: one
  trace spans A and B);
* ``permissions`` allows publishing to what ``PUBLISHES_TO`` declares;
* a running instance serves its contract (the AsyncAPI document) over NATS, the same document
  the ``contract`` command writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from lanes_support import Deployment, other_deployment
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_sink import OtlpSink
from worker_testkit import WorkerEnv, WorkerProcess, free_port, wait_until

from {{ cookiecutter.__package_name }}.runtime.binding import WorkerApp
from {{ cookiecutter.__package_name }}.runtime.consume.context import JobContext
from {{ cookiecutter.__package_name }}.runtime.contract import Downstream
from {{ cookiecutter.__package_name }}.runtime.names import JOB_TYPE
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob
from {{ cookiecutter.__package_name }}.runtime.operate.embedded import find_binary, stop_process
from {{ cookiecutter.__package_name }}.runtime.testing import WorkerUnderTest

DOWNSTREAM = "notification" if JOB_TYPE != "notification" else "receipt"  # B's job type
ADMIN_PASSWORD = "admin-pw-7c1e"  # noqa: S105 - a test server's own users
WORKER_PASSWORD = "worker-pw-2b9d"  # noqa: S105
VIOLATION = re.compile(r"(Publish|Subscription|Permissions) Violation")
EXIT_CONFIG = 78


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def random_trace() -> tuple[int, int]:
    return int(uuid.uuid4().hex, 16) or 1, int(uuid.uuid4().hex[:16], 16) or 1


@pytest.fixture
def downstream(worker_env: WorkerEnv, tmp_path: Path) -> Iterator[Deployment]:
    """B: another stream on A's subject root, job type ``DOWNSTREAM``, provisioned."""
    with other_deployment(worker_env.url, tmp_path / "b") as b:
        b.env.set("SUBJECT_ROOT", worker_env.subject_root)
        b.env.set("JOB_TYPE", DOWNSTREAM)
        b.env.provision()
        yield b


def stored_messages(env: WorkerEnv, stream: str) -> list[RawStreamMsg]:
    """Every message ``stream`` holds, oldest first."""

    async def go(js: JetStreamContext) -> list[RawStreamMsg]:
        info = await js.stream_info(stream)
        out: list[RawStreamMsg] = []
        assert info.state.first_seq is not None
        seq = info.state.first_seq
        for _ in range(info.state.messages):
            raw = await js.get_msg(stream, seq=seq, next=True)
            out.append(raw)
            assert raw.seq is not None
            seq = raw.seq + 1
        return out

    return env.js(go)


def publish_upstream(env: WorkerEnv, jobs: list[dict[str, Any]], parents: dict[str, str]) -> None:
    """A's jobs, each with ``Nats-Msg-Id`` = its id and its own ``traceparent``."""

    async def go(js: JetStreamContext) -> None:
        for job in jobs:
            headers = {"Nats-Msg-Id": job["id"], "traceparent": parents[job["id"]]}
            await js.publish(env.ingress, json.dumps(job).encode(), headers=headers)

    env.js(go)


def start_forwarder(env: WorkerEnv, instance: str, otlp: str = "") -> WorkerProcess:
    """A's worker: the demo app, forwarding one job to B on every try (tracing to ``otlp``)."""
    return env.spawn(
        name=instance,
        INSTANCE_ID=instance,
        DEMO_FORWARD_TO=DOWNSTREAM,
        PUBLISHES_TO=DOWNSTREAM,
        BACKOFF="0.05",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp,
        NO_PROXY="127.0.0.1",  # a proxy set for the machine would send the chassis to the SDK
    )


async def _request(url: str, subject: str) -> dict[str, Any]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        reply = await nc.request(subject, b"", timeout=5)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    finally:
        await nc.close()


# --------------------------------------------------------------------------------- exactly once


def test_each_upstream_job_creates_one_downstream_job_even_when_retried(
    worker_env: WorkerEnv, downstream: Deployment
) -> None:
    root = worker_env.subject_root
    target = f"{root}.jobs.{DOWNSTREAM}"
    run = uuid.uuid4().hex[:6]
    steady: list[dict[str, Any]] = [{"id": f"up-{run}-{i}"} for i in range(4)]
    flaky = [{"id": f"flaky-{run}-{i}", "fail_times": 1} for i in range(3)]
    twice = [{"id": f"twice-{run}", "fail_times": 2}]
    jobs = steady + flaky + twice
    parents = {str(job["id"]): traceparent(*random_trace()) for job in jobs}
    instance = f"a-{worker_env.token}"
    worker = start_forwarder(worker_env, instance)

    publish_upstream(worker_env, jobs, parents)
    worker.wait_done([job["id"] for job in jobs])

    # The flaky jobs really ran more than once: each try published (the demo forwards first).
    retries = Counter(r.get("job_id") for r in worker.with_msg("job failed, retry"))
    assert {job["id"]: retries[job["id"]] for job in flaky + twice} == {
        **{job["id"]: 1 for job in flaky},
        twice[0]["id"]: 2,
    }, worker.tail()

    # Every run of A's handler published before A acknowledged the job: B's stream is complete.
    stored = stored_messages(worker_env, downstream.stream)
    items = Counter(json.loads(m.data or b"{}")["item"] for m in stored)
    assert items == Counter(job["id"] for job in jobs), f"B stored {sorted(items.items())}"
    for message in stored:
        upstream = json.loads(message.data or b"{}")["item"]
        headers = message.headers or {}
        assert headers["Nats-Msg-Id"] == f"{upstream}:{target}:1"
        assert headers["traceparent"] == parents[upstream], "the trace did not cross to B"
        assert str(message.subject).startswith(f"{root}.{DOWNSTREAM}.g")  # B's route

    # B handles them: the pipeline runs end to end.
    b = downstream.start("b", "v1")
    b.proc.wait_done([f"{job['id']}:{target}:1" for job in jobs])

    # The instance serves its contract over NATS: the document 'contract' writes.
    endpoint = worker_env.settings().names.instance_subject(instance) + ".contract"
    served = asyncio.run(_request(worker_env.url, endpoint))
    written = json.loads(worker_env.cli_ok("contract", INSTANCE_ID=instance))
    assert served["asyncapi"] == written
    assert served["asyncapi"]["channels"]["jobs"]["address"] == worker_env.ingress
    assert worker.stop() == 0, worker.tail()


# --------------------------------------------------------------------------------- one trace


def test_the_downstream_job_joins_the_upstream_trace_with_telemetry_on(
    worker_env: WorkerEnv, downstream: Deployment
) -> None:
    """A PRODUCER span, child of A's CONSUMER span, carries the trace to B, whose CONSUMER span
    is its child: one trace from the upstream producer through A to B."""
    target = f"{worker_env.subject_root}.jobs.{DOWNSTREAM}"
    trace_id, parent_span = random_trace()
    job_id = f"traced-{uuid.uuid4().hex[:6]}"
    with OtlpSink() as sink:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "NO_PROXY": "127.0.0.1"}
        worker = start_forwarder(worker_env, f"a-traced-{worker_env.token}", sink.endpoint)
        publish_upstream(
            worker_env,
            [{"id": job_id, "fail_times": 1}],
            {job_id: traceparent(trace_id, parent_span)},
        )
        worker.wait_done([job_id])
        assert worker.stop() == 0, worker.tail()  # the graceful stop flushes the spans

        [message] = stored_messages(worker_env, downstream.stream)
        _version, sent_trace, sent_span, _flags = (message.headers or {})["traceparent"].split("-")
        assert int(sent_trace, 16) == trace_id
        spans = [s for s in sink.spans() if s.trace_id == trace_id]
        consumers = [s for s in spans if s.span.kind == Span.SPAN_KIND_CONSUMER]
        producers = [s for s in spans if s.span.kind == Span.SPAN_KIND_PRODUCER]
        assert len(consumers) == 2, "A's two tries"  # the first failed, after publishing
        assert {c.parent_id for c in consumers} == {parent_span}
        assert len(producers) == 2, "one PRODUCER span per try"
        assert {p.parent_id for p in producers} == {c.span_id for c in consumers}
        assert {p.span.name for p in producers} == {f"send {target}"}
        # The stored downstream job came from the first try (the second was a duplicate).
        assert int(sent_span, 16) in {p.span_id for p in producers}

        b = downstream.start("b-traced", "v1", **otel)
        b.proc.wait_done([f"{job_id}:{target}:1"])
        assert b.proc.stop() == 0, b.tail()
        in_b = [
            s
            for s in sink.consumer_spans()
            if s.trace_id == trace_id and DOWNSTREAM in s.span.name.split(" ")[-1].split(".")
        ]
        assert [s.parent_id for s in in_b] == [int(sent_span, 16)]


# --------------------------------------------------------------------------------- permissions


def test_permissions_allow_the_declared_downstream_subjects(worker_env: WorkerEnv) -> None:
    root = worker_env.subject_root
    allowed = json.loads(
        worker_env.cli_ok(
            "permissions", "--format", "json", PUBLISHES_TO=f"{DOWNSTREAM}, billing.jobs.invoice"
        )
    )["publish"]
    for subject in (
        f"{root}.jobs.{DOWNSTREAM}",
        f"{root}.jobs.{DOWNSTREAM}.*",
        "billing.jobs.invoice",
        "billing.jobs.invoice.*",
    ):
        assert subject in allowed
    conf = worker_env.cli_ok("permissions", PUBLISHES_TO=DOWNSTREAM)
    assert f'"{root}.jobs.{DOWNSTREAM}.*"' in conf
    assert "PUBLISHES_TO" in conf
    plain = json.loads(worker_env.cli_ok("permissions", "--format", "json"))["publish"]
    assert not [s for s in plain if DOWNSTREAM in s or "billing" in s]


async def _publish_as(user: str, password: str, url: str, subject: str, job_id: str) -> None:
    """A core NATS publish of ``{"id": job_id}`` as ``user`` (a stream may capture it)."""
    nc = await nats.connect(url, user=user, password=password, connect_timeout=5)
    try:
        data = json.dumps({"id": job_id}).encode()
        await nc.publish(subject, data, headers={"Nats-Msg-Id": job_id})
        await nc.flush()
    finally:
        await nc.close()


async def _stored_as_admin(url: str, stream: str) -> int:
    nc = await nats.connect(url, user="admin", password=ADMIN_PASSWORD, connect_timeout=5)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def test_the_least_privileged_worker_publishes_only_where_it_declared(
    worker_env: WorkerEnv, tmp_path: Path
) -> None:
    """On a server whose worker user is exactly what ``permissions`` prints for A with
    ``PUBLISHES_TO``, A's handler hands its job to B with no permission violation, and a
    subject A did not declare is refused."""
    root = worker_env.subject_root
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    authorization = worker_env.cli_ok("permissions", "--user", "a-worker", PUBLISHES_TO=DOWNSTREAM)
    admin_user = "    { user: admin, password: " + ADMIN_PASSWORD + " }\n"
    users = authorization.replace("  users = [\n", "  users = [\n" + admin_user, 1)
    assert users != authorization
    store = json.dumps(str(tmp_path / "secured-store"))
    conf = tmp_path / "secured.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n" + "jetstream { store_dir: " + store + " }\n" + users
    )
    log_path = tmp_path / "secured.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WORKER_NATS_PASSWORD": WORKER_PASSWORD},
        )

    def violations() -> list[str]:
        return [line for line in log_path.read_text().splitlines() if VIOLATION.search(line)]

    try:
        wait_until(lambda: "Server is ready" in log_path.read_text(), 15, "the secured server")
        b_stream = f"{worker_env.stream}_B"
        worker_env.cli_ok(  # B's stream: provisioned by its own (here: the admin) account
            "provision",
            JOB_TYPE=DOWNSTREAM,
            STREAM_NAME=b_stream,
            DLQ_STREAM_NAME=f"{b_stream}_DLQ",
            NATS_URL=url,
            NATS_USER="admin",
            NATS_PASSWORD=ADMIN_PASSWORD,
        )
        a = worker_env.spawn(
            name="a-secured",
            DEMO_FORWARD_TO=DOWNSTREAM,
            PUBLISHES_TO=DOWNSTREAM,
            NATS_URL=url,
            NATS_USER="a-worker",
            NATS_PASSWORD=WORKER_PASSWORD,
        )
        job_id = f"secured-{uuid.uuid4().hex[:6]}"
        asyncio.run(_publish_as("admin", ADMIN_PASSWORD, url, worker_env.ingress, job_id))
        a.wait_done([job_id])
        assert asyncio.run(_stored_as_admin(url, b_stream)) == 1
        assert not violations(), violations()
        assert a.stop() == 0, a.tail()

        undeclared = f"{root}.jobs.undeclared"
        asyncio.run(_publish_as("a-worker", WORKER_PASSWORD, url, undeclared, "x"))
        wait_until(
            lambda: [line for line in violations() if undeclared in line],
            10,
            f"the server to refuse {undeclared}",
        )
    finally:
        stop_process(server)


def test_a_bad_publishes_to_is_one_line_and_exit_78(worker_env: WorkerEnv) -> None:
    bad = worker_env.run_cli(["permissions"], env={"PUBLISHES_TO": "billing.invoice"})
    assert bad.returncode == EXIT_CONFIG, bad.stdout + bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
    assert "PUBLISHES_TO" in bad.stderr
    assert "<root>.jobs.<type>" in bad.stderr


# --------------------------------------------------------------------------------- in-process


def test_a_typed_downstream_keys_counts_and_validates(nats_url: str, clean_env: None) -> None:
    """In-process (the testing kit): a typed target from another worker's contract, the
    per-target count in the Nats-Msg-Id, keys, and a job the target's model refuses."""
    stored, acks = asyncio.run(_typed_downstream(nats_url))
    root = str(stored[0].subject).split(".", 1)[0]
    assert [(m.subject, (m.headers or {})["Nats-Msg-Id"]) for m in stored] == [
        (f"{root}.jobs.invoice.up-1-1", f"up-1:{root}.jobs.invoice:1"),
        (f"{root}.jobs.invoice.b64-Y3VzdG9tZXIgNw", f"up-1:{root}.jobs.invoice:2"),
        (f"{root}.jobs.invoice", f"up-1:{root}.jobs.invoice:3"),
    ]
    assert len(acks) == 3
    assert not any(a.duplicate for a in acks)


async def _typed_downstream(nats_url: str) -> tuple[list[RawStreamMsg], list[Any]]:
    other = f"T_{uuid.uuid4().hex[:10].upper()}"
    root = other.lower()
    contract = {"channels": {"jobs": {"address": f"{root}.jobs.invoice"}}}
    invoices = Downstream.from_contract(contract, DemoJob)
    acks: list[Any] = []

    async def handler(job: DemoJob, ctx: JobContext[Any]) -> None:
        if job.item == "bad":
            await ctx.publish({"id": "x", "quantity": 0}, to=invoices)  # quantity must be >= 1
        acks.append(await ctx.publish(DemoJob(id=f"{job.id}-1"), to=invoices))
        acks.append(await ctx.publish({"id": f"{job.id}-2"}, to=invoices, key="customer 7"))
        acks.append(await ctx.publish({"item": "no id"}, to=f"{root}.jobs.invoice"))

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name=other, subjects=[f"{root}.jobs.invoice", f"{root}.jobs.invoice.*"])
    try:
        app = WorkerApp("pipeline", DemoJob, handler)
        async with WorkerUnderTest(app, nats_url=nats_url) as kit:
            outcome = await kit.process(DemoJob(id="up-1"))
            assert outcome.acked, outcome.errors
            bad = await kit.process(DemoJob(id="up-bad", item="bad"), wait=10.0)
            assert bad.dead_lettered, bad
            assert bad.errors, bad
        stored = []
        info = await js.stream_info(other)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            stored.append(await js.get_msg(other, seq))
    finally:
        await js.delete_stream(other)
        await nc.close()
    return stored, acks
