"""The worker's command line (the console script named after the worker).

Every operator-facing failure is one line on stderr and a documented exit code (see
``errors.py``); only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ..binding import APPS
from ..errors import (
    EXIT_FAILURE,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    JETSTREAM_UNAVAILABLE,
    InputError,
    WorkerError,
    describe,
)
from ..names import DESCRIPTION, WORKER_NAME

if TYPE_CHECKING:  # heavy modules are imported by the commands that use them (fast --help)
    from nats.aio.client import Client
    from pydantic import BaseModel

    from ..binding import WorkerApp
    from ..observe.telemetry import Telemetry
    from ..settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_settings(**overrides: Any) -> Settings:
    from ..settings import load_settings as load

    return load(**overrides)


def load_app(name: str) -> WorkerApp:
    from ..binding import load_app as load

    return load(name)


def setup_if_wanted(settings: Settings, **options: Any) -> Telemetry | None:
    from ..observe.telemetry_config import setup_if_wanted as setup

    return setup(settings, **options)


def _version() -> str:
    from ... import __version__

    return __version__


EXIT_CODES_HELP = """exit codes:
  0   stopped cleanly (signal drained, or retired after its lane was routed away)
  1   unexpected error (a bug; the traceback is logged)
  2   bad command-line usage
  65  bad input (e.g. a payload that is not a valid job)
  69  NATS unreachable after the bounded connect retry, or (running) the
      connection was closed for good: the supervisor should restart the worker
  73  stream/consumer exists with settings JetStream cannot change in place
  75  route refused: no live instance of the target lane (start it, or --force),
      its job model breaks the current lane's contract (--force), or
      --rollback has no earlier lane
  77  the NATS account is not permitted to do this, or (running) the server
      stopped accepting its credentials
  78  invalid configuration (env var, .env, missing creds/TLS file, a NATS_URL
      host that does not exist)
  79  rollout rolled back: a gate failed (or --abort); new work is on the
      stable lane again, with the rolled-back lane's waiting and failed jobs
  130 a second signal cut the drain short; running jobs were handed back
"""


def _run_async(factory: Callable[[], Awaitable[T]], event_loop: str = "asyncio") -> T:
    """Run on ``event_loop``. The worker takes ``EVENT_LOOP``: uvloop by default (10 ms timers
    that overshoot by 0.5 ms, not 1.3, and quick jobs 6-10 % faster in most bench runs), asyncio
    when asked (about 2.4 MB less peak RSS); one-shot commands run on asyncio, which starts
    without importing uvloop."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - platforms without uvloop
            log.debug("uvloop is not installed: running on asyncio")
        else:
            return uvloop.run(factory())  # type: ignore[arg-type]
    return asyncio.run(factory())  # type: ignore[arg-type]


def _with_nats(settings: Settings, body: Callable[[Client], Awaitable[int]]) -> int:
    """Run one CLI command's body on a fresh connection that is closed afterwards."""

    async def go() -> int:
        from ..connection import connect

        nc = await connect(settings)
        try:
            return await body(nc)
        finally:
            await nc.close()

    return _run_async(go)


# --------------------------------------------------------------------------------- run


async def _run_worker(settings: Settings, app: WorkerApp, demo: int, dev: bool = False) -> int:
    from ..app import serve

    if not demo:
        return await serve(settings, app, dev=dev)
    done = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def launch_demo(worker: Any) -> None:
        tasks.append(asyncio.create_task(_demo(worker, settings, app, demo, done)))

    counted = replace(app, handler=_counting(app.handler, demo, done))
    try:
        return await serve(settings, counted, on_worker=launch_demo, dev=dev)
    finally:
        for task in tasks:
            task.cancel()


def _counting(handler: Any, count: int, done: asyncio.Event) -> Any:
    """Wrap the handler so the demo knows when ``count`` jobs were handled."""
    handled = 0

    async def wrapper(job: Any, ctx: Any) -> None:
        nonlocal handled
        await handler(job, ctx)
        handled += 1
        if handled >= count:
            done.set()

    return wrapper


def _demo_jobs(job_model: type[BaseModel], count: int) -> list[Any]:
    """Example jobs built from just an id; the second fails once (if the model allows it)."""
    from pydantic import ValidationError

    run = uuid.uuid4().hex[:6]
    jobs = [job_model.model_validate({"id": f"demo-{run}-{i}"}) for i in range(count)]
    if count > 1:
        # Shows a retry in the logs and spans; skipped quietly for models without the field.
        with contextlib.suppress(ValidationError):
            jobs[1] = job_model.model_validate({"id": f"demo-{run}-1", "fail_times": 1})
    return jobs


async def _demo(
    worker: Any, settings: Settings, app: WorkerApp, count: int, done: asyncio.Event
) -> None:
    """Publish ``count`` example jobs and one malformed payload, then stop when all are done."""
    from pydantic import ValidationError

    from ..publish import Producer, publish_many

    await worker.ready.wait()
    try:
        jobs = _demo_jobs(app.job_model, count)
    except ValidationError as exc:
        log.error(
            "--demo cannot build an example Job from just an id (%s); publish your own "
            "jobs with the 'publish' command instead",
            exc.errors()[0]["msg"],
        )
        worker.stop("demo impossible")
        return
    async with Producer(settings, worker.nc, telemetry=worker.telemetry) as producer:
        # A malformed payload first: it goes straight to the dead-letter queue, never retried.
        await publish_many(producer.js, [(settings.names.ingress, b'{"id": 42', None)])
        await producer.publish_all(jobs)
    log.info("demo: published %d jobs and 1 malformed payload to %s", count, settings.names.ingress)
    await done.wait()
    c = worker.counters
    log.info(
        "demo: %d jobs handled (%d retried, %d dead-lettered); next: '%s status', '%s dlq list'",
        count,
        c.retried,
        c.dead_lettered,
        WORKER_NAME,
        WORKER_NAME,
    )
    worker.stop("demo finished")


def cmd_run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.no_provision:
        overrides["provision"] = False
    settings = load_settings(**overrides)
    _setup_logging(settings, one_shot=False)
    app = load_app("demo" if args.demo else args.app)
    if not args.embedded_nats:
        return _run_async(lambda: _run_worker(settings, app, args.demo), settings.event_loop)
    from .embedded import EmbeddedNats, default_store

    url = urlsplit(settings.nats_url[0])
    port = url.port if url.hostname in ("127.0.0.1", "localhost") and url.port else 4222
    with EmbeddedNats(default_store(), port) as server:
        log.info(
            "embedded nats-server with JetStream on %s (store %s)", server.url, server.store_dir
        )
        settings = load_settings(**overrides, nats_url=[server.url])
        return _run_async(
            lambda: _run_worker(settings, app, args.demo, dev=True), settings.event_loop
        )


# --------------------------------------------------------------------------------- provision


def cmd_provision(args: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)

    async def body(nc: Client) -> int:
        from ..evolve.provision import provision

        report = await provision(nc.jetstream(), settings)
        for line in report.lines():
            print(line)
        return EXIT_OK

    return _with_nats(settings, body)


# --------------------------------------------------------------------------------- publish


def _read_payload(args: argparse.Namespace) -> bytes:
    """The payload as bytes: from --file, stdin ('-' or nothing) or the argument."""
    if args.file is not None:
        try:
            return Path(args.file).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {args.file}: {exc.strerror}") from None
    if args.payload in (None, "-"):
        return sys.stdin.buffer.read()
    return os.fsencode(args.payload)  # undoes the surrogate escapes of non-UTF-8 argv bytes


def _parse_jobs(data: bytes, job_model: type[BaseModel]) -> list[Any]:
    """A JSON object, a JSON array of objects, or JSON lines."""
    from pydantic import ValidationError

    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(
            "payload is not UTF-8 text (use --raw to send bytes as they are)"
        ) from None
    if not text:
        raise InputError("no job given: pass JSON as an argument, on stdin, or with --file")
    try:
        loaded = json.loads(text)
        items = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"payload is not JSON (line {exc.lineno}: {exc.msg})") from None
    jobs = []
    for n, item in enumerate(items, 1):
        try:
            jobs.append(job_model.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "job"
            raise InputError(f"job {n} is not a valid Job: {where}: {first['msg']}") from None
    return jobs


def cmd_publish(args: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)
    data = _read_payload(args)
    jobs = [] if args.raw else _parse_jobs(data, load_app(args.app).job_model)

    async def go() -> int:
        from ..publish import Producer, publish_many

        telemetry = setup_if_wanted(settings, traces_only=True)
        async with Producer(settings, telemetry=telemetry) as producer:
            if args.raw:  # bytes as given: for testing the DLQ path with bad payloads
                headers = {"Nats-Msg-Id": args.msg_id} if args.msg_id else None
                acks = await publish_many(producer.js, [(settings.names.ingress, data, headers)])
            else:
                acks = await producer.publish_all(jobs)
        if not acks:
            raise InputError("nothing was published")
        if telemetry is not None:
            telemetry.shutdown()
        dups = sum(1 for a in acks if a.duplicate)
        print(
            f"published {len(acks) - dups} job(s) to {settings.names.ingress}"
            + (f" ({dups} duplicate(s) dropped by the stream)" if dups else "")
        )
        return EXIT_OK

    from nats.errors import MaxPayloadError

    try:
        return _run_async(go)
    except MaxPayloadError:
        raise InputError(
            "a job is larger than the server's max_payload: make it smaller (store big data "
            "elsewhere and send a reference), or raise max_payload on the server"
        ) from None


# --------------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)

    async def body(nc: Client) -> int:
        from .status import collect, render

        report = await collect(nc, settings)
        print(json.dumps(report, indent=2) if args.json else render(report))
        return EXIT_OK

    return _with_nats(settings, body)


# --------------------------------------------------------------------------------- ecosystem


def cmd_ecosystem(args: argparse.Namespace) -> int:
    """Every worker on the account; ``--watch`` redraws until Ctrl-C or ``--count`` views."""
    settings = load_settings()
    _setup_logging(settings)
    if args.count is not None and args.count < 1:
        raise InputError("--count takes a positive number of views: ecosystem --watch --count 5")
    if args.interval <= 0:
        raise InputError("--interval takes a positive number of seconds: --interval 2")
    watch = args.watch or args.count is not None
    redraw = watch and not args.json and sys.stdout.isatty()

    async def body(nc: Client) -> int:
        from .ecosystem import collect_fleet, render_fleet

        shown = 0
        while True:
            started = asyncio.get_running_loop().time()
            report = await collect_fleet(nc, settings, window=args.window)
            if args.json:  # one JSON document per view (JSON lines under --watch)
                print(json.dumps(report, indent=None if watch else 2), flush=True)
            else:
                print(("\x1b[H\x1b[2J" if redraw else "") + render_fleet(report), flush=True)
                if watch and not redraw:
                    print(flush=True)
            shown += 1
            if not watch or (args.count is not None and shown >= args.count):
                return EXIT_OK
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, args.interval - elapsed))

    try:
        return _with_nats(settings, body)
    except KeyboardInterrupt:  # Ctrl-C ends a watch; that is how it is meant to stop
        return EXIT_OK


# --------------------------------------------------------------------------------- dashboard


def cmd_dashboard(args: argparse.Namespace) -> int:
    """A read-only web page of the fleet, live (Server-Sent Events), until Ctrl-C or SIGTERM."""
    settings = load_settings()
    _setup_logging(settings, one_shot=False)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a TCP port: give 1-65535 (or 0 for any)")
    if args.interval <= 0:
        raise InputError("--interval takes a positive number of seconds: --interval 1")

    async def body(nc: Client) -> int:
        from .dashboard import serve_dashboard

        return await serve_dashboard(
            nc, settings, host=args.host, port=args.port, interval=args.interval
        )

    try:
        return _with_nats(settings, body)
    except KeyboardInterrupt:
        return EXIT_OK


# --------------------------------------------------------------------------------- route


def cmd_route(args: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)
    explain = args.lane == "explain"
    if explain and not args.key:
        raise InputError("route explain needs a key: route explain <key>")
    if not explain and args.key:
        raise InputError(f"unexpected argument {args.key!r}: route [LANE] [--percent P]")
    if args.lane and args.rollback:
        raise InputError("give a lane or --rollback, not both")
    if args.percent is not None and not (args.lane and 1 <= args.percent <= 100):
        raise InputError(
            "--percent takes an integer from 1 to 100, with a lane: route v2 --percent 10"
        )

    async def body(nc: Client) -> int:
        from ..evolve import lanes
        from ..evolve.routing import describe_split

        js = nc.jetstream()
        if explain:
            state = await lanes.current_state(js, settings)
            _print_explain(settings, state, args.key, args.json)
            return EXIT_OK
        if not args.lane and not args.rollback:
            state = await lanes.current_state(js, settings)
            _print_route(state, await lanes.history(js, settings), args.json)
            return EXIT_OK
        result = await lanes.switch(
            nc,
            settings,
            args.lane,
            percent=args.percent or 100,
            rollback=args.rollback,
            force=args.force,
            take_backlog=args.take_backlog,
            note="rollback" if args.rollback else (args.note or ""),
        )
        split, previous = describe_split(result.split), describe_split(result.previous)
        if args.json:
            print(
                json.dumps(
                    {
                        "changed": result.changed,
                        "split": result.split.as_dict(),
                        "previous": result.previous.as_dict(),
                        "generation": result.gen,
                        "moved": result.moved,
                        "left_in_flight": result.left_in_flight,
                    }
                )
            )
        elif not result.changed:
            print(f"route already is {split}: nothing changed")
        else:
            print(f"new work -> {split} (was {previous}; generation {result.gen})")
            if result.split.ramping and settings.stream_replicas > 1:
                print(
                    f"unkeyed jobs (published to {settings.names.ingress} without a key) stay on "
                    f"{result.split.current} until the ramp reaches 100 % on a replicated stream; "
                    "keyed jobs follow the percentage (README, Lanes)"
                )
            if args.take_backlog:
                held = (
                    f"; {result.left_in_flight} still held by the old lane's workers "
                    "(they finish them there)"
                    if result.left_in_flight
                    else ""
                )
                print(f"moved {result.moved} waiting job(s) to the new split{held}")
        return EXIT_OK

    return _with_nats(settings, body)


def _print_route(state: Any, changes: Sequence[Any], as_json: bool) -> None:
    from ..evolve.routing import describe_split

    split = state.split
    if as_json:
        print(
            json.dumps(
                {
                    "current": split.current,
                    "ramping": split.ramping,
                    "percent": split.percent if split.ramping else 0,
                    "generation": state.gen,
                    "generations": sorted(state.generations),
                    "history": [c.__dict__ for c in changes],
                },
                indent=2,
            )
        )
        return
    print(f"new work -> {describe_split(split)} (generation {state.gen})")
    if changes:
        print(f"\n{'WHEN':<21} {'FROM':<6} {'TO':<6} {'%':>4} {'BY':<28} NOTE")
    for c in changes:
        print(
            f"{c.at:<21} {c.previous or '-':<6} {c.lane:<6} {c.percent:>4} {c.by[:28]:<28} {c.note}"
        )


def _print_explain(settings: Settings, state: Any, key: str, as_json: bool) -> None:
    """Where a job published with ``key`` lands under the current split."""
    from ..evolve.split import RANK, bucket_of

    subject = settings.names.keyed_ingress(key)
    bucket = bucket_of(subject)
    lane = state.split.lane_of_bucket(bucket)
    if as_json:
        print(json.dumps({"key": key, "subject": subject, "bucket": bucket, "lane": lane}))
        return
    print(
        f"key {key!r} -> subject {subject} -> bucket {bucket} (rank {RANK.index(bucket)}) "
        f"-> lane {lane}"
    )


# --------------------------------------------------------------------------------- rollout


def _read_smoke(path: str | None) -> list[str]:
    """The smoke jobs: JSON lines (each one job), kept as text."""
    if path is None:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the smoke file {path}: {exc}") from None
    jobs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {n} is not JSON ({exc.msg}): one job per line") from None
        jobs.append(line.strip())
    if not jobs:
        raise InputError(f"the smoke file {path} holds no job: one JSON job per line")
    return jobs


def cmd_rollout(args: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings, one_shot=not (args.lane and not args.status))
    from ..evolve.rollout import Gates, parse_steps

    gates = Gates(
        steps=parse_steps(args.steps),
        interval=args.interval,
        max_failure_rate=args.max_failure_rate,
        max_latency_ratio=args.max_latency_ratio,
        min_jobs=args.min_jobs,
        smoke_timeout=args.smoke_timeout,
        lease=args.lease,
        rollback_timeout=args.rollback_timeout,
    )
    if not args.abort and not args.status:
        if not args.lane:
            raise InputError("name the lane to roll out (rollout v2), or --status / --abort")
        gates.check()
    smoke = _read_smoke(args.smoke) if args.lane and not args.status else []

    async def body(nc: Client) -> int:
        from ..evolve import rollout

        if args.status:
            shown = await rollout.show(nc, settings)
            if args.json:
                print(json.dumps(shown, indent=2))
            else:
                print(_render_rollout(shown))
            return EXIT_OK
        if args.abort:
            print(await rollout.abort(nc, settings, args.reason or "rollout --abort"))
            return EXIT_OK
        print(await rollout.run_rollout(nc, settings, args.lane, gates, smoke, args.force))
        return EXIT_OK

    return _with_nats(settings, body)


def _render_rollout(shown: dict[str, Any] | None) -> str:
    """``rollout --status`` and the rollout part of ``status``."""
    if shown is None:
        return "no rollout yet"
    phase = {"smoke": "smoke gate", "step": "ramping"}.get(shown["phase"], shown["phase"])
    head = f"rollout {shown['lane']} from {shown['stable']}: {phase}"
    if shown.get("step"):
        head += f", step {shown['step']} of {len(shown['steps'])} ({shown['percent']} %)"
    if shown["phase"] not in ("promoted", "rolled_back"):
        head += f"; controller {shown.get('controller')} (lease {shown.get('lease_left_s')}s)"
    lines = [head]
    analysis = shown.get("analysis")
    if analysis:
        for side in ("new", "stable"):
            f = analysis[side]
            p95 = f["p95_ms"] if f["p95_ms"] is not None else "-"
            lines.append(
                f"  {side:<6} tries {f['succeeded'] + f['failed']:>6}  failed {f['failed']:>5}  "
                f"p95 {p95} ms  instances {f['instances']}"
            )
        lines.append(f"  verdict {analysis['verdict']}: {analysis['reason']}")
    for d in shown.get("decisions") or []:
        lines.append(f"  {d['at']} {d['verdict']:<12} {d['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- dlq


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)
    import io

    if isinstance(sys.stdout, io.TextIOWrapper):  # dead letters hold any text: never crash on it
        sys.stdout.reconfigure(errors="backslashreplace")

    async def body(nc: Client) -> int:
        from ..consume import dlq

        js = nc.jetstream()
        await _require_dlq_stream(js, settings)
        if args.dlq_command == "list":
            entries = [e async for e in dlq.iter_dead_letters(js, settings, args.limit)]
            if args.json:
                print(json.dumps([e.as_json() for e in entries], indent=2, ensure_ascii=False))
            else:
                _print_dlq(entries)
        elif args.dlq_command == "show":
            if args.seq < 1:
                raise InputError(f"no DLQ entry with seq {args.seq}: see 'dlq list'")
            entry = await dlq.get_dead_letter(js, settings, args.seq)
            if args.raw:
                sys.stdout.flush()
                sys.stdout.buffer.write(entry.data)
                sys.stdout.buffer.flush()
            else:
                _show_dlq_entry(entry)
        elif args.dlq_command == "replay":
            wanted = set(args.seq or [])
            if not wanted and not args.all:
                raise InputError("say which entries: --seq N [--seq M ...] or --all")
            entries = [
                e async for e in dlq.iter_dead_letters(js, settings) if args.all or e.seq in wanted
            ]
            missing = wanted - {e.seq for e in entries}
            if missing:
                raise InputError(f"no DLQ entry with seq {sorted(missing)}: see 'dlq list'")
            telemetry = setup_if_wanted(settings, traces_only=True)
            try:
                count = await dlq.replay(js, settings, entries, telemetry)
            finally:
                if telemetry is not None:
                    telemetry.shutdown()
            print(f"replayed {count} job(s) to {settings.names.ingress}")
        elif args.dlq_command == "purge":
            if not args.yes:
                raise InputError("purging deletes every DLQ entry for good: add --yes")
            print(f"purged {await dlq.purge(js, settings)} DLQ entr(ies)")
        return EXIT_OK

    return _with_nats(settings, body)


async def _require_dlq_stream(js: Any, settings: Settings) -> None:
    """A missing DLQ stream is a setup problem (exit 78), not an unreachable server."""
    from nats.js.errors import NotFoundError

    from ..errors import ConfigError

    try:
        await js.stream_info(settings.dlq_stream_name)
    except NotFoundError:
        raise ConfigError(
            f"the DLQ stream {settings.dlq_stream_name} does not exist: run 'provision' "
            "(or start the worker) first, and check DLQ_STREAM_NAME"
        ) from None


def _print_dlq(entries: Sequence[Any]) -> None:
    from ..consume.dlq import show

    if not entries:
        print("DLQ is empty")
        return
    print(f"{'SEQ':>6}  {'REASON':<14}  {'TRIES':>5}  {'SIZE':>8}  {'MSG ID':<24}  ERROR")
    for e in entries:
        s = e.summary
        error = f"{s['error_type']}: {s['error']}"
        if s["problem"]:
            error = f"[{s['problem']}] {error}"
        print(
            f"{s['dlq_seq']:>6}  {s['reason'] or '?':<14}  {s['deliveries']:>5}  "
            f"{s['size']:>8}  {show(str(s['msg_id'] or '-'))[:24]:<24}  {show(error)[:100]}"
        )


def _show_dlq_entry(entry: Any) -> None:
    """Everything about one entry, readable whatever bytes it holds (``dlq show``)."""
    from ..consume.dlq import show

    s = entry.summary
    print(f"DLQ entry {entry.seq} ({entry.form} format", end="")
    print(f", {len(entry.parts)} part(s))" if entry.parts else ")")
    if entry.problem:
        print(f"PROBLEM: {show(entry.problem)}")
    for label, key in (
        ("reason", "reason"),
        ("deliveries", "deliveries"),
        ("error type", "error_type"),
        ("error", "error"),
        ("subject", "subject"),
        ("stream seq", "stream_seq"),
        ("msg id", "msg_id"),
        ("worker", "worker_version"),
        ("lane", "lane"),
        ("time", "time"),
    ):
        print(f"{label + ':':<12}{show(str(s[key] if s[key] is not None else '-'))}")
    pairs = entry.original_header_pairs()
    print(f"\noriginal headers ({len(pairs)}):")
    for name, value in pairs:
        print(f"  {name}: {value}")
    print(f"\npayload ({len(entry.data)} bytes", end="")
    try:
        parsed = json.loads(entry.data)
    except (ValueError, RecursionError):
        print(", not JSON; exact bytes: --raw):")
        text = entry.data.decode("utf-8", "backslashreplace")
        print("\n".join(show(line) for line in text.split("\n")))
        return
    print(", JSON):")
    try:
        pretty = json.dumps(parsed, indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        pretty = entry.data.decode()
    print("\n".join(show(line) for line in pretty.split("\n")))


# --------------------------------------------------------------------------------- permissions


def cmd_permissions(args: argparse.Namespace) -> int:
    from .permissions import nsc_commands, server_config, subjects

    settings = load_settings()
    if args.format == "json":
        print(json.dumps(subjects(settings), indent=2))
    elif args.format == "nsc":
        print(nsc_commands(settings, args.account, args.user or WORKER_NAME), end="")
    else:
        print(server_config(settings, args.user or WORKER_NAME, args.password_var), end="")
    return EXIT_OK


# --------------------------------------------------------------------------------- contract


def cmd_contract(args: argparse.Namespace) -> int:
    """The job's JSON Schema or the worker's AsyncAPI 3.0 document (see ``contract.py``)."""
    from ..contract import document

    settings = load_settings()
    doc = document(args.format, load_app(args.app).job_model, settings)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote the {args.format} contract of {WORKER_NAME} to {args.output}")
    return EXIT_OK


# --------------------------------------------------------------------------------- health


def cmd_health(args: argparse.Namespace) -> int:
    from ..observe.health import probe

    settings = load_settings()
    path = "/livez" if args.live else "/readyz"
    port = args.port or settings.health_port
    ok, body = probe(f"http://127.0.0.1:{port}{path}", timeout=args.timeout)
    print(f"{path}: {'ok' if ok else 'FAIL'} {body}")
    return EXIT_OK if ok else EXIT_FAILURE


# --------------------------------------------------------------------------------- main


def _setup_logging(settings: Settings, one_shot: bool = True) -> None:
    from ..connection import quiet_denials
    from ..observe.logs import setup_logging

    if one_shot:  # the command's output is its result; the log only says what went wrong
        quiet_denials()
        level = max(logging.getLevelName(settings.log_level), logging.WARNING)
        setup_logging(logging.getLevelName(level), settings.log_format, version=_version())
        return
    setup_logging(settings.log_level, settings.log_format, lane=settings.lane, version=_version())


def _explain_nats_error(exc: Exception) -> tuple[str, int]:
    """One line and an exit code for the broker errors an operator can act on."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import (
        APIError,
        NoStreamResponseError,
        NotFoundError,
        ServiceUnavailableError,
    )

    if isinstance(exc, ServiceUnavailableError):
        return JETSTREAM_UNAVAILABLE, EXIT_UNAVAILABLE
    if isinstance(exc, NoStreamResponseError):
        return (
            "no stream stores this subject: run 'provision' (or start the worker) first, "
            "and check SUBJECT_ROOT/STREAM_NAME",
            EXIT_UNAVAILABLE,
        )
    if isinstance(exc, NotFoundError):
        return (
            f"not found on the server ({exc.description}): run 'provision' first, and "
            "check STREAM_NAME/DLQ_STREAM_NAME",
            EXIT_UNAVAILABLE,
        )
    if isinstance(exc, APIError) and (exc.code == 403 or "permission" in str(exc).lower()):
        return (
            f"the NATS account may not do this ({exc.description}): see the 'permissions' command",
            EXIT_NOPERM,
        )
    if isinstance(exc, NatsTimeout | TimeoutError | NoRespondersError):
        from ..connection import denied

        if denied:  # the server refused the request; the client only saw no answer
            return (
                f"the NATS account may not do this ({denied[-1].removeprefix('nats: ')}): "
                "see the 'permissions' command",
                EXIT_NOPERM,
            )
        return "NATS did not answer in time: check the server and NATS_URL", EXIT_UNAVAILABLE
    return f"NATS error: {describe(exc)}", EXIT_UNAVAILABLE


class _VersionAction(argparse.Action):
    """``--version``, with the version read only when asked for (it costs a metadata import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=WORKER_NAME,
        description=f"{DESCRIPTION} Configuration comes from environment variables and .env.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "--app",
        choices=APPS,
        default="user",
        help="'demo' runs and publishes the chassis's demo job (sleeps and failures on request) "
        "instead of yours: for trying the chassis and for its tests, never for production",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="consume jobs until SIGTERM (drains gracefully)",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--embedded-nats",
        action="store_true",
        help="start a local nats-server with JetStream (store in ./.nats-data)",
    )
    p.add_argument(
        "--demo",
        type=int,
        default=0,
        metavar="N",
        help="publish N example jobs once ready, and stop when they are processed",
    )
    p.add_argument(
        "--no-provision",
        action="store_true",
        help="do not create/update streams and consumers (same as PROVISION=false)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("provision", help="create or update the stream, consumer and DLQ")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("publish", help="publish job(s): JSON object, array or lines")
    p.add_argument("payload", nargs="?", help="JSON; omit or '-' to read stdin")
    p.add_argument("--file", "-f", help="read the JSON from this file")
    p.add_argument(
        "--raw",
        action="store_true",
        help="publish the bytes as given, unvalidated (to test the DLQ path)",
    )
    p.add_argument("--msg-id", help="Nats-Msg-Id for --raw")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("status", help="stream, consumer and DLQ counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "ecosystem",
        help="every worker on the NATS account: lanes, instances, backlog, rate, DLQ, routes",
        description="Discovers the workers on the account (micro services answering $SRV.INFO, "
        "and the streams whose metadata name a worker) and shows, for each, its lanes and "
        "their state, live instances, backlog, rate, dead letters and recent route changes. "
        "Your own worker is marked with '*'.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable (JSON lines with --watch)")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument(
        "--count", type=int, metavar="N", help="with --watch: stop after N views (implies --watch)"
    )
    p.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between views (2)"
    )
    p.add_argument(
        "--window",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds instances have to answer discovery (0.5)",
    )
    p.set_defaults(func=cmd_ecosystem)

    p = sub.add_parser(
        "dashboard",
        help="a read-only web page of the fleet, updated live",
        description="Serves one page (no build step, no JavaScript dependency) showing what "
        "'ecosystem' shows, updated as it changes (Server-Sent Events): a route switch or a "
        "drain appears as it happens. Read-only. Binds 127.0.0.1 unless told otherwise; it has "
        "no login, so publish it beyond the host only behind your own access control.",
    )
    p.add_argument("--port", type=int, default=8090, help="TCP port (default 8090; 0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (1)"
    )
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser(
        "route",
        help="show, switch or ramp the lanes that receive new work",
        description="Without arguments: the current split and the history of changes. "
        "With a lane: route all new work to it, or --percent P of it, sticky by job key "
        "(atomically, on the server). Stored jobs stay on the lane they were routed to; old "
        "lanes drain them and their workers retire. 'route explain KEY' names the lane a "
        "job with that key lands on.",
    )
    p.add_argument("lane", nargs="?", help="lane to route new work to, e.g. v2; or 'explain KEY'")
    p.add_argument("key", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "--percent",
        type=int,
        metavar="P",
        help="send only P%% of new work (1-100) to the lane, sticky by job key; the rest "
        "stays on the current lane",
    )
    p.add_argument("--rollback", action="store_true", help="restore the previous split")
    p.add_argument("--force", action="store_true", help="switch even with no live instance")
    p.add_argument(
        "--take-backlog",
        action="store_true",
        help="also move the old lane's waiting jobs onto the new lane",
    )
    p.add_argument("--note", help="free text recorded in the route history")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser(
        "rollout",
        help="ramp a lane by steps with gates; roll back on its own when one fails",
        description="Runs a controller until the lane is promoted (exit 0) or rolled back "
        "(exit 79). Before the first step: the schema gate (the lane's job model must accept "
        "the stable lane's jobs; --force skips it) and the smoke gate (--smoke). At each step: "
        "the lane's failure rate and p95 are compared with the stable lane's over the same "
        "window; too few jobs means wait. A failed gate routes all new work back to the stable "
        "lane at once, retires the lane, and hands its waiting and failed jobs to the stable "
        "lane. One controller at a time (a lease in KV); a new one resumes a dead one's rollout.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("lane", nargs="?", help="the lane to roll out, e.g. v2")
    p.add_argument("--steps", default="1,10,50,100", help="percentages, ending at 100")
    p.add_argument("--interval", type=float, default=60.0, help="seconds per step (60)")
    p.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.05,
        help="failed tries allowed above the stable lane's rate, 0..1 (0.05)",
    )
    p.add_argument(
        "--max-latency-ratio", type=float, default=2.0, help="p95 allowed vs stable (2.0)"
    )
    p.add_argument("--min-jobs", type=int, default=20, help="tries needed to judge a step (20)")
    p.add_argument("--smoke", metavar="FILE", help="jobs (JSON lines) the lane must do first")
    p.add_argument("--smoke-timeout", type=float, default=30.0, help="seconds (30)")
    p.add_argument("--lease", type=float, default=15.0, help="controller lease, seconds (15)")
    p.add_argument(
        "--rollback-timeout",
        type=float,
        default=60.0,
        help="seconds a rollback waits for the lane's jobs to come back (60)",
    )
    p.add_argument("--force", action="store_true", help="skip the schema gate")
    p.add_argument("--abort", action="store_true", help="roll the running rollout back now")
    p.add_argument("--reason", help="recorded with --abort")
    p.add_argument("--status", action="store_true", help="show the rollout and its decisions")
    p.add_argument("--json", action="store_true", help="with --status")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("dlq", help="inspect, replay or purge dead letters")
    dsub = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    d = dsub.add_parser("list", help="show dead letters, oldest first")
    d.add_argument("--limit", type=int, default=None)
    d.add_argument(
        "--json", action="store_true", help="with a payload preview and the original headers"
    )
    d = dsub.add_parser("show", help="one dead letter in full: reason, original headers, payload")
    d.add_argument("--seq", type=int, required=True, help="DLQ sequence (see 'dlq list')")
    d.add_argument("--raw", action="store_true", help="write the exact payload bytes to stdout")
    d = dsub.add_parser("replay", help="republish dead letters to the ingress subject")
    d.add_argument("--seq", type=int, action="append", help="DLQ sequence (repeatable)")
    d.add_argument("--all", action="store_true", help="replay every entry")
    d = dsub.add_parser("purge", help="delete every dead letter")
    d.add_argument("--yes", action="store_true", help="confirm")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser(
        "permissions",
        help="print least-privilege NATS permissions for this worker's user",
        description="Server config (authorization block), nsc commands, or JSON allow-lists, "
        "derived from the current settings (stream, DLQ, subjects).",
    )
    p.add_argument("--format", choices=["conf", "nsc", "json"], default="conf")
    p.add_argument("--user", help=f"user name (default {WORKER_NAME})")
    p.add_argument("--account", default="APP", help="account for --format nsc")
    p.add_argument(
        "--password-var",
        default="WORKER_NATS_PASSWORD",
        help="env var nats-server reads the password from (conf format)",
    )
    p.set_defaults(func=cmd_permissions)

    p = sub.add_parser(
        "contract",
        help="print the job contract: an AsyncAPI 3.0 document, or the job's JSON Schema",
        description="Derived from the job model and the settings (subject root, job type, "
        "stream, NATS_URL): the ingress channel (and its keyed form), the dead-letter channel, "
        "the job message with its Nats-Msg-Id and traceparent headers, and who sends and "
        "receives. A running instance serves the same over NATS (its micro service's "
        "'contract' endpoint).",
    )
    p.add_argument(
        "--format",
        choices=["asyncapi", "jsonschema"],
        default="asyncapi",
        help="asyncapi (default): the AsyncAPI 3.0 document; jsonschema: the job's JSON Schema",
    )
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_contract)

    p = sub.add_parser("health", help="probe the running worker's health endpoint (exit 0/1)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ready", action="store_true", help="check /readyz (default)")
    group.add_argument("--live", action="store_true", help="check /livez")
    p.add_argument("--port", type=int, default=None, help="default: HEALTH_PORT")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except WorkerError as exc:
        print(f"{WORKER_NAME}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        nats_errors = sys.modules.get("nats.errors")  # loaded by any command that used NATS
        if nats_errors is not None and isinstance(exc, nats_errors.Error):  # JetStream's too
            message, exit_code = _explain_nats_error(exc)
            print(f"{WORKER_NAME}: error: {message}", file=sys.stderr)
            return exit_code
        logging.getLogger(WORKER_NAME).exception("unexpected error")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
