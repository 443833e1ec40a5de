"""The contract is readable by tools we did not write.

A generated worker writes its AsyncAPI 3.0 document with ``contract``; ``@asyncapi/parser`` (the
AsyncAPI initiative's own parser and validator, from npm, run with node) must accept it, with no
error and no warning, and read back its channels, operations and headers. The job's JSON Schema
must pass the ``jsonschema`` package's meta-schema check and accept a valid job. A running
instance serves the same document over NATS: a node program using nats.js (the ``nats`` npm
package) finds the ``contract`` endpoint through the micro protocol (``$SRV.INFO``) and fetches it.

The npm packages are installed once per machine into ``.venv/npm`` (pinned, idempotent). Without
node or npm these tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from .conftest import REPO_ROOT, Baker
from .fleet_support import nats_server
from .test_generated_suite import InstalledProject, install_layered

pytestmark = pytest.mark.slow

NPM_PACKAGES = ("@asyncapi/parser@3.6.6", "nats@2.29.3")
NPM_DIR = REPO_ROOT / ".venv" / "npm"
WORKER = "notification-sender"
ANSWERS = {"worker_name": WORKER, "subject_root": "shop", "job_type": "notify"}
PACKAGE = "notification_sender"

VALIDATE_JS = """
const { Parser } = require("@asyncapi/parser");
const fs = require("node:fs");
async function check(parser, path) {
  const { document, diagnostics } = await parser.parse(fs.readFileSync(path, "utf8"));
  const out = {
    diagnostics: diagnostics.map((d) => ({ severity: d.severity, code: d.code,
      message: d.message, path: d.path })),
    parsed: Boolean(document),
  };
  if (document) {
    out.version = document.version();
    out.channels = Object.fromEntries(document.channels().all().map((c) => [c.id(), {
      address: c.address(), parameters: c.parameters().all().map((p) => p.id()) }]));
    out.operations = Object.fromEntries(document.operations().all().map((o) => [o.id(), {
      action: o.action(), channels: o.channels().all().map((c) => c.id()) }]));
    out.messages = Object.fromEntries(document.components().messages().all().map((m) => [m.id(), {
      headers: m.hasHeaders() ? Object.keys(m.headers().properties()) : [],
      payloadType: m.hasPayload() ? m.payload().type() : null }]));
    out.servers = document.servers().all().map((s) => [s.host(), s.protocol()]);
  }
  return out;
}
(async () => {
  const parser = new Parser();
  const results = {};
  for (const path of process.argv.slice(2)) results[path] = await check(parser, path);
  console.log(JSON.stringify(results));
})().catch((err) => { console.error(String(err)); process.exit(1); });
"""

FETCH_JS = """
const { connect, StringCodec } = require("nats");
(async () => {
  const [url, worker] = process.argv.slice(2);
  const nc = await connect({ servers: url });
  const sc = StringCodec();
  // The micro protocol: every instance answers $SRV.INFO.<worker> with its endpoints.
  const info = JSON.parse(sc.decode((await nc.request(`$SRV.INFO.${worker}`, "", {
    timeout: 5000 })).data));
  const endpoint = info.endpoints.find((e) => e.name === "contract");
  const reply = await nc.request(endpoint.subject, "", { timeout: 5000 });
  const contract = JSON.parse(sc.decode(reply.data));
  console.log(JSON.stringify({ subject: endpoint.subject, contract }));
  await nc.close();
})().catch((err) => { console.error(String(err)); process.exit(1); });
"""


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed: apt-get install nodejs npm (Debian's packages)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """``.venv/npm/node_modules`` with the pinned packages (installed once per machine)."""
    _tool("node")
    npm = _tool("npm")
    NPM_DIR.mkdir(parents=True, exist_ok=True)
    stamp = NPM_DIR / "installed.txt"
    wanted = "\n".join(NPM_PACKAGES)
    with (NPM_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time on this machine
        if not stamp.is_file() or stamp.read_text() != wanted:
            done = subprocess.run(
                [npm, "install", "--prefix", NPM_DIR, "--no-audit", "--no-fund",
                 "--loglevel=error", *NPM_PACKAGES],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                pytest.fail(f"npm install failed:\n{done.stdout}{done.stderr}", pytrace=False)
            stamp.write_text(wanted)
    return NPM_DIR / "node_modules"


def node(modules: Path, script: str, *args: str, cwd: Path, check: bool = True) -> Any:
    """Run ``script`` with the npm packages; its JSON output (None if it failed, unchecked)."""
    path = cwd / "script.cjs"
    path.write_text(script, encoding="utf-8")
    done = subprocess.run(
        ["node", path, *args],
        env={**os.environ, "NODE_PATH": str(modules)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0 and not check:
        return None
    assert done.returncode == 0, f"node exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def project(bake: Baker, tmp_path_factory: pytest.TempPathFactory) -> InstalledProject:
    return install_layered(bake.fresh(**ANSWERS), tmp_path_factory.mktemp("contract-venv"))


def cli(project: InstalledProject, *args: str, **env: str) -> str:
    done = subprocess.run(
        [project.bin / "python", "-m", PACKAGE, *args],
        env={**os.environ, "HEALTH_PORT": "0", **env},
        cwd=project.baked.path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def problems(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Errors (0) and warnings (1); info (2, e.g. 'a newer AsyncAPI exists') and hints pass."""
    return [d for d in result["diagnostics"] if d["severity"] <= 1]


@pytest.fixture(scope="module")
def parsed(
    project: InstalledProject, node_modules: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """What @asyncapi/parser makes of the documents (one node run: it takes seconds to start):
    ``user`` and ``demo`` as ``contract --output`` wrote them, and ``broken``: the same with one
    mistake (an operation action AsyncAPI 3 does not have)."""
    where = tmp_path_factory.mktemp("asyncapi")
    for app in ("user", "demo"):
        cli(project, "--app", app, "contract", "--output", str(where / f"{app}.json"))
    broken = json.loads((where / "user.json").read_text())
    broken["operations"]["publishJob"]["action"] = "publish"  # AsyncAPI 2's word
    (where / "broken.json").write_text(json.dumps(broken))
    names = ("user", "demo", "broken")
    results = node(node_modules, VALIDATE_JS, *(str(where / f"{n}.json") for n in names), cwd=where)
    return {name: results[str(where / f"{name}.json")] for name in names}


@pytest.mark.parametrize("app", ["user", "demo"])
def test_asyncapi_parser_accepts_the_document(parsed: dict[str, dict[str, Any]], app: str) -> None:
    result = parsed[app]
    assert result["parsed"], result
    assert not problems(result), json.dumps(result["diagnostics"], indent=2)
    assert result["version"] == "3.0.0"
    assert result["channels"] == {
        "jobs": {"address": "shop.jobs.notify", "parameters": []},
        "keyedJobs": {"address": "shop.jobs.notify.{key}", "parameters": ["key"]},
        "deadLetters": {"address": "shop.dlq.notify", "parameters": []},
    }
    actions = {name: op["action"] for name, op in result["operations"].items()}
    assert actions == {
        "publishJob": "send",
        "publishKeyedJob": "send",
        "processJob": "receive",
        "processKeyedJob": "receive",
        "deadLetterJob": "send",
    }
    job = result["messages"]["job"]
    assert {"Nats-Msg-Id", "traceparent"} <= set(job["headers"])
    assert job["payloadType"] == "object"
    assert result["servers"] == [["127.0.0.1:4222", "nats"]]


def test_the_parser_is_not_a_rubber_stamp(parsed: dict[str, dict[str, Any]]) -> None:
    """The same document with one mistake is refused: the acceptance above means something."""
    assert any(d["severity"] == 0 for d in parsed["broken"]["diagnostics"]), parsed["broken"]


def test_the_json_schema_passes_its_meta_schema_and_takes_a_job(project: InstalledProject) -> None:
    schema = json.loads(cli(project, "contract", "--format", "jsonschema"))
    validator = jsonschema.validators.validator_for(schema)
    assert validator is jsonschema.Draft202012Validator
    validator.check_schema(schema)
    validator(schema).validate({"id": "A-1", "item": "book", "quantity": 2})
    with pytest.raises(jsonschema.ValidationError):
        validator(schema).validate({"item": "no id"})


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A real nats-server with JetStream on a free loopback port."""
    with nats_server(tmp_path / "store") as url:
        yield url


def test_a_nats_js_client_fetches_the_contract_from_a_running_instance(
    project: InstalledProject, node_modules: Path, tmp_path: Path, nats_url: str
) -> None:
    env = {**os.environ, "NATS_URL": nats_url, "HEALTH_PORT": "0", "INSTANCE_ID": "interop-1"}
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        worker = subprocess.Popen(
            [project.bin / "python", "-m", PACKAGE, "run"],
            env=env, cwd=project.baked.path, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        fetched: dict[str, Any] | None = None
        while fetched is None:  # until the instance registered its micro service
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no contract within 30 s\n{log.read_text()}"
            fetched = node(node_modules, FETCH_JS, nats_url, WORKER, cwd=tmp_path, check=False)
            if fetched is None:
                time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(30)
    assert fetched["subject"].startswith("shop."), fetched["subject"]  # the worker's own root
    assert fetched["subject"].endswith(".interop-1.contract"), fetched["subject"]
    served = fetched["contract"]
    assert served["worker"] == WORKER
    assert served["job_type"] == "notify"
    # the document the parser accepted above, but for the server it was written against
    assert served["asyncapi"] == json.loads(cli(project, "contract", NATS_URL=nats_url))
