"""The job contract (JSON Schema and AsyncAPI 3.0) and the pipeline's naming, without NATS.

An external validator (``@asyncapi/parser``, run with node) checks the document in the template's
own suite (``tests/test_contract_interop.py``); here: its structure, that every reference in it
resolves, that the job schema is the model's, and what ``ctx.publish`` puts on the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from {{ cookiecutter.__package_name }}.runtime import JobContext, connection
from {{ cookiecutter.__package_name }}.runtime.contract import (
    JSON_SCHEMA_DIALECT,
    ContractError,
    Downstream,
    asyncapi,
    document,
    ingress_of,
    json_schema,
)
from {{ cookiecutter.__package_name }}.runtime.errors import ConfigError, InputError
from {{ cookiecutter.__package_name }}.runtime.names import JOB_TYPE, SUBJECT_ROOT
from {{ cookiecutter.__package_name }}.runtime.operate import cli
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob
from {{ cookiecutter.__package_name }}.runtime.operate.permissions import (
    downstream_subjects,
    server_config,
    subjects,
)
from {{ cookiecutter.__package_name }}.runtime.settings import Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"subject_root": "shop", "job_type": "invoice", **overrides}
    return load_settings(_env_file=None, **values)


def contract_of(model: type[BaseModel], **overrides: Any) -> dict[str, Any]:
    return asyncapi(model, settings(**overrides), worker="w", version="1.2.3", description="D.")


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# --------------------------------------------------------------------------------- JSON Schema


def test_the_json_schema_is_the_models() -> None:
    schema = json_schema(DemoJob)
    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    assert schema["type"] == "object"
    assert schema["required"] == ["id"]
    assert schema["additionalProperties"] is False  # extra="forbid"
    assert schema["properties"]["quantity"]["minimum"] == 1
    assert {k: v for k, v in schema.items() if k != "$schema"} == DemoJob.model_json_schema()


class Address(BaseModel):
    street: str
    city: str = Field(description="City name.")


class Order(BaseModel):
    """An order with nested models."""

    model_config = ConfigDict(extra="forbid")

    id: str
    ship_to: Address
    bill_to: Address | None = None


class Tree(BaseModel):
    id: str
    children: list[Tree] = []


def test_nested_models_keep_their_definitions() -> None:
    schema = json_schema(Order)
    assert schema["properties"]["ship_to"] == {"$ref": "#/$defs/Address"}
    assert "Address" in schema["$defs"]


# --------------------------------------------------------------------------------- AsyncAPI


def test_the_asyncapi_document_describes_ingress_keyed_ingress_and_dead_letters() -> None:
    doc = contract_of(DemoJob)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "w"
    assert doc["info"]["version"] == "1.2.3"
    channels = doc["channels"]
    assert channels["jobs"]["address"] == "shop.jobs.invoice"
    assert channels["keyedJobs"]["address"] == "shop.jobs.invoice.{key}"
    assert set(channels["keyedJobs"]["parameters"]) == {"key"}
    assert channels["deadLetters"]["address"] == "shop.dlq.invoice"
    assert channels["jobs"]["x-nats-jetstream"]["duplicateWindowSeconds"] == 120.0
    ops = {name: (op["action"], op["channel"]["$ref"]) for name, op in doc["operations"].items()}
    assert ops == {
        "publishJob": ("send", "#/channels/jobs"),
        "publishKeyedJob": ("send", "#/channels/keyedJobs"),
        "processJob": ("receive", "#/channels/jobs"),
        "processKeyedJob": ("receive", "#/channels/keyedJobs"),
        "deadLetterJob": ("send", "#/channels/deadLetters"),
    }


def test_the_job_message_has_the_models_payload_and_the_wire_headers() -> None:
    doc = contract_of(DemoJob, duplicate_window=30)
    message = doc["components"]["messages"]["job"]
    assert message["contentType"] == "application/json"
    headers = message["headers"]
    assert headers["type"] == "object"
    assert {"Nats-Msg-Id", "traceparent", "tracestate"} <= set(headers["properties"])
    assert "30 s" in headers["properties"]["Nats-Msg-Id"]["description"]
    assert message["correlationId"]["location"] == "$message.header#/Nats-Msg-Id"
    payload = resolve(doc, message["payload"]["$ref"])
    assert payload == DemoJob.model_json_schema()
    assert doc["components"]["messages"]["deadLetter"]["headers"]["properties"]["Dlq-Reason"]


@pytest.mark.parametrize("model", [DemoJob, Order, Tree])
def test_every_reference_resolves_and_definitions_are_components(model: type[BaseModel]) -> None:
    doc = contract_of(model)
    text = json.dumps(doc)
    assert "#/$defs/" not in text, "a JSON Schema reference would point outside the document"
    assert '"$defs"' not in text
    for ref in refs(doc):
        assert resolve(doc, ref) is not None, ref
    assert json.loads(text) == doc  # plain JSON


def test_nested_and_recursive_models_become_component_schemas() -> None:
    order = contract_of(Order)
    assert set(order["components"]["schemas"]) == {"Order", "Address"}
    ship_to = order["components"]["schemas"]["Order"]["properties"]["ship_to"]
    assert ship_to == {"$ref": "#/components/schemas/Address"}
    tree = contract_of(Tree)
    assert tree["components"]["messages"]["job"]["payload"] == {"$ref": "#/components/schemas/Tree"}
    assert set(tree["components"]["schemas"]) == {"Tree"}


def test_servers_come_from_nats_url_without_credentials() -> None:
    doc = contract_of(DemoJob, nats_url=["nats://alice:s3cret@n1.example:4222", "tls://n2.example"])
    text = json.dumps(doc["servers"])
    assert "s3cret" not in text
    assert "alice" not in text
    assert {name: (s["host"], s["protocol"]) for name, s in doc["servers"].items()} == {
        "nats1": ("n1.example:4222", "nats"),
        "nats2": ("n2.example:4222", "nats"),
    }
    assert "TLS" in doc["servers"]["nats2"]["description"]
    websocket = contract_of(DemoJob, nats_url=["wss://u:p@edge.example"])["servers"]
    assert websocket == {
        "nats": {**websocket["nats"], "host": "edge.example:443", "protocol": "wss"}
    }


def test_document_picks_the_format_and_refuses_others() -> None:
    assert document("jsonschema", DemoJob, settings())["$schema"] == JSON_SCHEMA_DIALECT
    assert document("asyncapi", DemoJob, settings())["asyncapi"] == "3.0.0"
    with pytest.raises(InputError, match="asyncapi or jsonschema"):
        document("openapi", DemoJob, settings())


def test_a_model_without_a_json_schema_is_one_line() -> None:
    class Opaque:
        pass

    class Strange(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        id: str
        thing: Opaque

    with pytest.raises(ContractError) as caught:
        json_schema(Strange)
    assert "\n" not in str(caught.value)
    assert "Strange" in str(caught.value)
    assert caught.value.exit_code == 1


# --------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("target", "ingress"),
    [
        ("notification", "shop.jobs.notification"),
        (" notification ", "shop.jobs.notification"),
        ("billing.jobs.invoice", "billing.jobs.invoice"),
    ],
)
def test_targets_name_an_ingress(target: str, ingress: str) -> None:
    assert ingress_of(target, "shop") == ingress


@pytest.mark.parametrize(
    "target", ["", "a.b", "billing.jobs", "billing.jobs.invoice.key", "x.jobs.*", "a b", "a.jobs.>"]
)
def test_other_targets_are_refused_with_the_fix(target: str) -> None:
    with pytest.raises(ValueError, match=r"<root>\.jobs\.<type>"):
        ingress_of(target, "shop")


def test_a_downstream_from_a_contract_document_or_file(tmp_path: Path) -> None:
    doc = contract_of(DemoJob)
    assert Downstream.from_contract(doc).ingress == "shop.jobs.invoice"
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(doc))
    assert Downstream.from_contract(path, DemoJob) == Downstream("shop.jobs.invoice", DemoJob)
    with pytest.raises(InputError, match=r"channels\.jobs\.address"):
        Downstream.from_contract({"asyncapi": "3.0.0"})
    with pytest.raises(InputError, match="cannot read"):
        Downstream.from_contract(tmp_path / "missing.json")


def test_a_typed_downstream_validates_what_it_sends() -> None:
    typed = Downstream("shop.jobs.invoice", DemoJob)
    data, job_id = typed.encode({"id": "A-1", "quantity": 2})
    assert json.loads(data)["quantity"] == 2
    assert job_id == "A-1"
    with pytest.raises(ValidationError):
        typed.encode({"id": "A-1", "quantity": 0})
    untyped = Downstream("shop.jobs.invoice")
    assert untyped.encode({"x": 1}) == (b'{"x":1}', None)
    assert untyped.encode(DemoJob(id="B")) == (DemoJob(id="B").model_dump_json().encode(), "B")


# --------------------------------------------------------------------------------- PUBLISHES_TO


def test_publishes_to_is_parsed_and_reaches_permissions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBLISHES_TO", "notification, billing.jobs.invoice,")
    s = load_settings(_env_file=None, subject_root="shop")
    assert s.publishes_to == ["notification", "billing.jobs.invoice"]
    assert downstream_subjects(s) == [
        "shop.jobs.notification",
        "shop.jobs.notification.*",
        "billing.jobs.invoice",
        "billing.jobs.invoice.*",
    ]
    publish = subjects(s)["publish"]
    assert set(downstream_subjects(s)) <= set(publish)
    assert len(publish) == len(set(publish))
    assert "PUBLISHES_TO" in server_config(s, "u", "PW")
    monkeypatch.delenv("PUBLISHES_TO")
    assert downstream_subjects(load_settings(_env_file=None)) == []


def test_a_bad_publishes_to_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBLISHES_TO", "notification,billing.invoice")
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert message.startswith("invalid configuration: PUBLISHES_TO: 'billing.invoice'")
    assert "\n" not in message


# --------------------------------------------------------------------------------- ctx.publish


class FakeJetStream:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> Any:
        self.sent.append((subject, data, dict(headers)))
        return None


class FakeClient:
    def __init__(self) -> None:
        self.js = FakeJetStream()

    def jetstream(self) -> FakeJetStream:
        return self.js


def delivery(
    client: FakeClient, attempt: int = 1, headers: dict[str, str] | None = None
) -> JobContext[Any]:
    """A delivery of stream STREAM's message 7 on the shop root, as the chassis hands it over."""
    return JobContext(
        Msg(
            _client=cast(Any, client),
            subject="shop.invoice.g1.3.45.6.7.invoice.A-1",
            reply=f"$JS.ACK.STREAM.consumer.{attempt}.7.7.1700000000000000000.0",
            data=b"{}",
            headers=headers,
        )
    )


def test_publish_derives_the_msg_id_from_the_upstream_job_and_the_target() -> None:
    client = FakeClient()

    async def handle(ctx: JobContext[Any]) -> None:
        await ctx.publish({"id": "n-1"}, to="notification")
        await ctx.publish(DemoJob(id="n-2"), to="notification", key="customer 7")
        await ctx.publish({"no": "id"}, to="billing.jobs.invoice")

    upstream = {"Nats-Msg-Id": "A-1", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    for attempt in (1, 2):  # a redelivery publishes the very same messages
        asyncio.run(handle(delivery(client, attempt, upstream)))
    first, second = client.js.sent[:3], client.js.sent[3:]
    assert first == second
    assert [(subject, h["Nats-Msg-Id"]) for subject, _, h in first] == [
        ("shop.jobs.notification.n-1", "A-1:shop.jobs.notification:1"),
        ("shop.jobs.notification.b64-Y3VzdG9tZXIgNw", "A-1:shop.jobs.notification:2"),
        ("billing.jobs.invoice", "A-1:billing.jobs.invoice:1"),
    ]
    # telemetry off: the upstream's trace headers travel as they are
    assert all(h["traceparent"] == upstream["traceparent"] for _, _, h in first)


def test_without_a_msg_id_the_upstream_is_its_stream_sequence() -> None:
    client = FakeClient()
    asyncio.run(delivery(client).publish({"id": "n-1"}, to="notification"))
    [(_, _, headers)] = client.js.sent
    assert headers == {"Nats-Msg-Id": "STREAM:7:shop.jobs.notification:1"}


def test_a_bad_target_fails_the_handler_with_the_fix() -> None:
    with pytest.raises(ValueError, match="names no worker's ingress"):
        asyncio.run(delivery(FakeClient()).publish({"id": "x"}, to="shop.notification"))


# --------------------------------------------------------------------------------- the command


def test_the_contract_command_prints_or_writes_the_document(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["--app", "demo", "contract", "--format", "jsonschema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema(DemoJob)
    target = tmp_path / "asyncapi.json"
    assert cli.main(["--app", "demo", "contract", "--output", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    written = json.loads(target.read_text())
    assert written["channels"]["jobs"]["address"] == f"{SUBJECT_ROOT}.jobs.{JOB_TYPE}"


def test_an_unwritable_output_is_one_line_and_exit_65(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "asyncapi.json"
    assert cli.main(["--app", "demo", "contract", "-o", str(missing)]) == 65
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot write {missing}" in err


def test_a_publish_the_server_refused_fails_at_once_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A permissions violation reaches the client as an error line while the publish times out:
    that publish is not retried (it cannot succeed), and the handler's error says what to do."""
    client = FakeClient()
    calls: list[str] = []

    async def refused(subject: str, data: bytes, headers: dict[str, str]) -> Any:
        calls.append(subject)
        raise NatsTimeoutError

    monkeypatch.setattr(client.js, "publish", refused)
    monkeypatch.setattr(
        connection, "denied", ['nats: Permissions Violation for Publish to "shop.jobs.mail.n-1"']
    )
    with pytest.raises(PermissionError, match=r"declare shop\.jobs\.mail in PUBLISHES_TO"):
        asyncio.run(delivery(client, 1, {"Nats-Msg-Id": "A-1"}).publish({"id": "n-1"}, to="mail"))
    assert calls == ["shop.jobs.mail.n-1"]
