"""Log lines: one JSON object per line with correlation fields; secrets never reach a line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider

from {{ cookiecutter.__package_name }} import __version__
from {{ cookiecutter.__package_name }}.runtime.consume.worker import _job_fields
from {{ cookiecutter.__package_name }}.runtime.errors import EXIT_CONFIG, ConfigError
from {{ cookiecutter.__package_name }}.runtime.names import WORKER_NAME
from {{ cookiecutter.__package_name }}.runtime.observe.logs import JsonFormatter, setup_logging
from {{ cookiecutter.__package_name }}.runtime.observe.telemetry import TraceContextFilter
from {{ cookiecutter.__package_name }}.runtime.operate import cli
from {{ cookiecutter.__package_name }}.runtime.settings import load_settings

CANARY = "hunter2-Zq9xK7-do-not-log"
JOB_LINE_FIELDS = ("job_id", "subject", "stream_seq", "attempt")


def js_msg(job_id: str = "A-1", *, delivered: int = 2, stream_seq: int = 41) -> Msg:
    """A JetStream delivery as the client sees it (metadata comes from the reply subject)."""
    reply = f"$JS.ACK.ORDERS.worker-v1.{delivered}.{stream_seq}.7.1700000000000000000.3"
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject="orders.v1.order",
        reply=reply,
        data=b"{}",
        headers={"Nats-Msg-Id": job_id},
    )


def record(
    msg: str,
    *args: object,
    level: int = logging.WARNING,
    extra: Mapping[str, object] | None = None,
) -> logging.LogRecord:
    """A record as ``log.warning(msg, *args, extra=extra)`` makes it."""
    return logging.getLogger("test.logs").makeRecord(
        "test.logs", level, __file__, 1, msg, args, None, extra=extra
    )


def parse(line: str) -> dict[str, Any]:
    assert "\n" not in line, line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging rewires the root logger: put it back afterwards."""
    root = logging.getLogger()
    nats_log, asyncio_log = logging.getLogger("nats.aio.client"), logging.getLogger("asyncio")
    saved = (root.handlers[:], root.level, nats_log.level, asyncio_log.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        nats_log.setLevel(saved[2])
        asyncio_log.setLevel(saved[3])


def test_debug_logging_leaves_out_the_event_loops_internals(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A one-shot command at LOG_LEVEL=DEBUG prints its result once: asyncio's own DEBUG line
    ("Using selector: EpollSelector", at every loop start) is not the worker's to log."""
    setup_logging("DEBUG", "json")

    async def nothing() -> None:
        return None

    cli._run_async(nothing, "asyncio")  # noqa: SLF001 - the loop the CLI's commands run on
    logging.getLogger("test.logs").debug("ours")
    lines = capsys.readouterr().err.strip().splitlines()
    assert [parse(line)["msg"] for line in lines] == ["ours"]


# --------------------------------------------------------------------------------- JSON lines


def test_json_line_has_the_standard_and_static_fields() -> None:
    line = parse(
        JsonFormatter({"worker": WORKER_NAME, "lane": "v1", "version": "1.2.3"}).format(
            record("started %s lane=%s", "1.2.3", "v1", level=logging.INFO)
        )
    )
    assert line["msg"] == "started 1.2.3 lane=v1"
    assert line["level"] == "info"
    assert line["logger"] == "test.logs"
    assert line["worker"] == WORKER_NAME
    assert line["lane"] == "v1"
    assert line["version"] == "1.2.3"
    assert line["ts"].endswith("Z")
    assert "T" in line["ts"]
    assert not {"args", "levelno", "pathname", "exc_info", "stack_info"} & set(line)


def test_job_line_carries_correlation_fields() -> None:
    """The worker's job lines (retry, dead letter, 'job done') as they reach the formatter."""
    msg = js_msg("A-1", delivered=2, stream_seq=41)
    line = parse(
        JsonFormatter().format(
            record("job failed, retry in %gs", 1.0, extra=_job_fields(msg))  # as worker.py logs it
        )
    )
    assert {k: line[k] for k in JOB_LINE_FIELDS} == {
        "job_id": "A-1",
        "subject": "orders.v1.order",
        "stream_seq": 41,
        "attempt": 2,
    }
    assert "trace_id" not in line
    assert "span_id" not in line


def test_replayed_job_line_names_the_original_job() -> None:
    msg = js_msg("A-1:replay:9")
    msg.headers = {"Nats-Msg-Id": "A-1:replay:9", "Job-Id": "A-1"}
    assert _job_fields(msg)["job_id"] == "A-1"


def test_job_line_gets_the_current_trace_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    rec = record("job done", level=logging.DEBUG, extra=_job_fields(js_msg()))
    with tracer.start_as_current_span("process orders.v1.order") as span:
        assert TraceContextFilter().filter(rec)
        ctx = span.get_span_context()
    line = parse(JsonFormatter().format(rec))
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")
    assert len(line["trace_id"]) == 32
    assert len(line["span_id"]) == 16
    assert line["job_id"] == "A-1"


def test_odd_values_and_exceptions_stay_one_json_line() -> None:
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        odd = {"where": Path("/tmp/x"), "obj": object()}  # noqa: S108
        rec = record("boom\nwith a newline", extra=odd)
        rec.exc_info = sys.exc_info()
    line = parse(JsonFormatter().format(rec))
    assert line["msg"] == "boom\nwith a newline"
    assert line["where"] == "/tmp/x"  # noqa: S108
    assert line["obj"].startswith("<object object")
    assert "ValueError: first line" in line["exc"]
    assert "Traceback" in line["exc"]


def test_setup_logging_json_writes_one_object_per_line(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", "json", lane="v7", version=__version__)
    log = logging.getLogger(f"{WORKER_NAME}.test")
    log.info("hello %s", "world")
    log.debug("not at INFO")
    log.warning("job failed", extra=_job_fields(js_msg("B-2")))
    lines = [parse(x) for x in capsys.readouterr().err.splitlines()]
    assert [x["msg"] for x in lines] == ["hello world", "job failed"]
    for line in lines:
        assert line["worker"] == WORKER_NAME
        assert line["lane"] == "v7"
        assert line["version"] == __version__
    assert lines[1]["job_id"] == "B-2"
    assert logging.getLogger("nats.aio.client").level == logging.CRITICAL


def test_setup_logging_auto_is_json_when_not_a_terminal(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", "auto")  # pytest's captured stderr is not a TTY
    logging.getLogger("x").warning("plain")
    assert parse(capsys.readouterr().err.strip())["msg"] == "plain"


def test_setup_logging_text_is_for_people(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", "text")
    logging.getLogger("x").warning("plain")
    err = capsys.readouterr().err
    assert "WARNING" in err
    assert "plain" in err
    assert not err.lstrip().startswith("{")


def test_text_logs_keep_the_job_fields_as_key_value(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job id, subject and trace id a JSON line carries are on a text line too."""
    setup_logging("INFO", "text")
    logging.getLogger("x").warning(
        "job failed",
        extra={"job_id": "A-1", "subject": "r.jobs.t", "trace_id": "ab" * 16, "note": "two words"},
    )
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f'job failed job_id=A-1 subject=r.jobs.t trace_id={"ab" * 16} note="two words"'
    ), err


# --------------------------------------------------------------------------------- secrets


def _config_error(**overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None, **overrides)
    return info.value


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"nats_password": CANARY}, "NATS_PASSWORD"),  # password without a user
        ({"nats_user": "svc", "nats_password": CANARY, "concurrency": 0}, "CONCURRENCY"),
        ({"nats_url": [f"nats://svc:{CANARY}@127.0.0.1:99999"]}, "NATS_URL"),
        ({"nats_url": [f"nats://svc:{CANARY}@"]}, "NATS_URL"),
        ({"nats_url": [f"{CANARY}@127.0.0.1:4222", "bogus://x"]}, "NATS_URL"),
        ({"nats_token": CANARY, "backoff": "-1"}, "BACKOFF"),
        ({"nats_nkey_seed": CANARY, "health_port": 70000}, "HEALTH_PORT"),
    ],
)
def test_config_errors_never_contain_a_secret(
    overrides: dict[str, object], names: str, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    exc = _config_error(**overrides)
    assert names in str(exc)
    assert CANARY not in str(exc)
    # Logged the way an operator would see it, traceback included.
    setup_logging("INFO", "json")
    try:
        raise exc
    except ConfigError:
        logging.getLogger(WORKER_NAME).exception("configuration rejected: %s", exc)
    err = capsys.readouterr().err
    line = parse(err.strip())
    assert "ConfigError" in line["exc"]
    assert CANARY not in err


def test_secret_settings_are_masked_when_printed() -> None:
    settings = load_settings(
        _env_file=None, nats_user="svc", nats_password=CANARY, nats_token=CANARY
    )
    assert CANARY not in repr(settings)
    assert CANARY not in str(settings)
    assert CANARY not in json.dumps(settings.model_dump(mode="json"))
    assert settings.nats_password is not None
    assert settings.nats_password.get_secret_value() == CANARY


@pytest.mark.parametrize(
    "env",
    [
        {"NATS_PASSWORD": CANARY},
        {"NATS_USER": "svc", "NATS_PASSWORD": CANARY, "LOG_LEVEL": "LOUD"},
        {"NATS_URL": f"nats://svc:{CANARY}@127.0.0.1:0"},
        {"NATS_TOKEN": CANARY, "MAX_DELIVER": "many"},
    ],
)
def test_cli_config_error_is_one_line_without_the_secret(
    env: dict[str, str],
    clean_env: None,  # conftest: no setting from the shell, cwd without a .env
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert cli.main(["status"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert CANARY not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{WORKER_NAME}: error: invalid configuration")
