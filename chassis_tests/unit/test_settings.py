"""Settings come from environment variables; every mistake is one ConfigError naming the variable,
and no secret value ever appears in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from {{ cookiecutter.__package_name }}.runtime.errors import EXIT_CONFIG, ConfigError
from {{ cookiecutter.__package_name }}.runtime.names import (
    JOB_TYPE,
    STREAM_NAME,
    SUBJECT_ROOT,
    WORKER_NAME,
)
from {{ cookiecutter.__package_name }}.runtime.settings import (
    Settings,
    load_settings,
    redact_url,
)

pytestmark = pytest.mark.usefixtures("clean_env")

SECRET = "s3cr3t-Value-9f2c"  # noqa: S105 - a fake secret the tests look for


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(_env_file=None)


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(monkeypatch, **env)
    assert caught.value.exit_code == EXIT_CONFIG == 78
    message = str(caught.value)
    assert "\n" not in message, "a ConfigError is one line"
    return message


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch)
    assert s.nats_url == ["nats://127.0.0.1:4222"]
    assert s.stream_name == STREAM_NAME
    assert s.dlq_stream_name == f"{STREAM_NAME}_DLQ"
    assert s.lane == "v1"
    assert s.names.durable == f"{WORKER_NAME}-v1"
    assert s.names.ingress == f"{SUBJECT_ROOT}.jobs.{JOB_TYPE}"
    assert s.names.stream_subjects[:2] == [s.names.ingress, f"{s.names.ingress}.*"]
    assert s.names.keyed_ingress("A-1") == f"{SUBJECT_ROOT}.jobs.{JOB_TYPE}.A-1"
    assert s.names.dlq_subject == f"{SUBJECT_ROOT}.dlq.{JOB_TYPE}"


@pytest.mark.parametrize(
    "url",
    ["localhost:4222", "nats", "nats:4222", "tls://n1:4443,n2:4222", "ws://a:80,wss://b:443"],
)
def test_terse_server_urls_stay_valid(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """nats-py takes ``host:port`` and a bare host (port 4222); a compose service name such as
    ``nats`` is a real host. Whether a name exists is DNS's answer, checked when connecting."""
    assert load(monkeypatch, NATS_URL=url).nats_url == url.split(",")


def test_env_vars_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(
        monkeypatch,
        NATS_URL="nats://a:4222, nats://b:4223",
        BACKOFF="0.1, 0.2,5",
        CONCURRENCY="7",
        LOG_LEVEL="debug",
        CONSUMER_NAME="custom",
        LANE="v9",
    )
    assert s.nats_url == ["nats://a:4222", "nats://b:4223"]
    assert s.backoff == [0.1, 0.2, 5.0]
    assert s.concurrency == 7
    assert s.log_level == "DEBUG"
    assert s.names.durable == "custom"
    assert s.names.consumer("v9") == "custom"  # CONSUMER_NAME names this instance's lane
    assert s.names.consumer("v1") == f"{WORKER_NAME}-v1"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"CONCURRENCY": "0"}, ["CONCURRENCY"]),
        ({"CONCURRENCY": "lots"}, ["CONCURRENCY"]),
        ({"ACK_WAIT": "0.5"}, ["ACK_WAIT"]),
        ({"MAX_DELIVER": "0"}, ["MAX_DELIVER"]),
        ({"BACKOFF": "1,0"}, ["BACKOFF"]),
        ({"BACKOFF": ""}, ["BACKOFF"]),
        ({"NATS_URL": "http://example.com:80"}, ["NATS_URL"]),
        ({"NATS_URL": "nats://:4222"}, ["NATS_URL"]),
        ({"NATS_URL": "nats://host:99999"}, ["NATS_URL"]),
        ({"NATS_URL": " , "}, ["NATS_URL"]),
        ({"NATS_URL": "ws://a:80,nats://b:4222"}, ["NATS_URL"]),  # nats-py refuses the mix
        ({"NATS_URL": "wss://a:443,b:4222"}, ["NATS_URL"]),
        ({"SUBJECT_ROOT": "a.b"}, ["SUBJECT_ROOT"]),
        ({"JOB_TYPE": "*"}, ["JOB_TYPE"]),
        ({"STREAM_NAME": "has.dot"}, ["STREAM_NAME"]),
        ({"LOG_FORMAT": "xml"}, ["LOG_FORMAT"]),
        ({"HEALTH_PORT": "70000"}, ["HEALTH_PORT"]),
        ({"NATS_CREDS": "/nonexistent/worker.creds"}, ["NATS_CREDS"]),
        ({"NATS_TLS_CA": "/nonexistent/ca.pem"}, ["NATS_TLS_CA"]),
        ({"CONCURRENCY": "0", "FETCH_BATCH": "0"}, ["CONCURRENCY", "FETCH_BATCH"]),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: list[str]
) -> None:
    message = config_error(monkeypatch, **env)
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"NATS_PASSWORD": SECRET}, "NATS_PASSWORD is set but NATS_USER is not"),
        ({"CONCURRENCY": "50", "MAX_ACK_PENDING": "10"}, "MAX_ACK_PENDING"),
        ({"STREAM_NAME": "SAME", "DLQ_STREAM_NAME": "SAME"}, "DLQ_STREAM_NAME"),
        ({"NATS_TLS_CERT": __file__}, "NATS_TLS_KEY"),
    ],
)
def test_bad_combinations_are_explained(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    assert needle in config_error(monkeypatch, **env)


def test_missing_creds_file_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.creds"
    message = config_error(monkeypatch, NATS_CREDS=str(missing))
    assert str(missing) in message
    creds = tmp_path / "ok.creds"
    creds.write_text("not checked until connect")
    assert load(monkeypatch, NATS_CREDS=str(creds)).nats_creds == creds


@pytest.mark.parametrize(
    "env",
    [
        {"NATS_PASSWORD": SECRET},  # password without user
        {"NATS_PASSWORD": SECRET, "CONCURRENCY": "0"},  # secret set, another field wrong
        {"NATS_USER": "bob", "NATS_PASSWORD": SECRET, "MAX_DELIVER": "-1"},
        {"NATS_TOKEN": SECRET, "NATS_URL": "bogus://x:1"},
        {"NATS_NKEY_SEED": SECRET, "BACKOFF": "-1"},
        {"NATS_URL": f"nats://bob:{SECRET}@:4222"},  # a bad URL carrying credentials
        {"NATS_URL": f"nats://bob:{SECRET}@host:4222,ftp://bob:{SECRET}@h:1"},
        {"NATS_URL": f"tls://{SECRET}@host:0"},
    ],
)
def test_secrets_never_appear_in_config_errors(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    message = config_error(monkeypatch, **env)
    assert SECRET not in message
    assert SECRET[:8] not in message


def test_secrets_are_hidden_in_the_settings_object(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, NATS_USER="bob", NATS_PASSWORD=SECRET, NATS_TOKEN=SECRET)
    assert SECRET not in repr(s)
    assert SECRET not in str(s.model_dump())
    assert s.nats_password is not None
    assert s.nats_password.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"nats://bob:{SECRET}@host:4222", "nats://***@host:4222"),
        (f"{SECRET}@host:4222", "***@host:4222"),
        ("nats://host:4222", "nats://host:4222"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_event_loop_runs_the_worker_on_the_loop_asked_for(
    monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    import asyncio

    from {{ cookiecutter.__package_name }}.runtime.operate.cli import _run_async

    settings = load(monkeypatch, EVENT_LOOP=choice)

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert _run_async(loop_module, settings.event_loop) == choice


def test_a_bad_event_loop_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, EVENT_LOOP="trio")
    assert "EVENT_LOOP" in message
    assert "uvloop" in message
