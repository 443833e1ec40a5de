"""Security against real nats-server processes, each configured by the test that needs it.

* Every credential kind the worker supports (user/password, token, NKey seed and seed file, a
  ``.creds`` file in operator/JWT mode) lets it ``provision``, ``run`` and ``publish``; a wrong
  secret is refused with exit 77 and one line, fast.
* TLS with a CA the test makes, and mTLS (``verify: true``) with a client certificate; a missing
  client certificate or an untrusted server fails with exit 69 and one line that says TLS.
* Least privilege: the server's only worker user is the ``permissions`` command's output. The
  worker's whole life (provision, run, publish, status, DLQ list and replay, a route to another
  lane and the old lane's retirement, a drain) causes no "Permissions Violation"; another
  worker's streams and subjects are refused.
* Secrets (password, token, NKey seed) never appear in any output, in success or failure.

Operator/JWT mode is set up without ``nsc``: operator, account and user JWTs are signed here with
the ``nkeys`` package (ed25519), and the server preloads the accounts (``resolver: MEMORY``).
Everything listens on loopback; every process is stopped however a test ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client
from nats.js.api import StreamConfig
from worker_testkit import SETTINGS_VARS, WorkerProcess, free_port, port_open, wait_until

import {{ cookiecutter.__package_name }} as package
from {{ cookiecutter.__package_name }}.runtime.connection import connect
from {{ cookiecutter.__package_name }}.runtime.names import JOB_TYPE, STREAM_NAME, WORKER_NAME
from {{ cookiecutter.__package_name }}.runtime.operate.embedded import find_binary, stop_process
from {{ cookiecutter.__package_name }}.runtime.settings import load_settings

pytestmark = pytest.mark.integration

PACKAGE = package.__name__
# Subprocesses import the code this test imported, whatever an editable install points at.
assert package.__file__ is not None
SOURCE_ROOT = str(Path(package.__file__).resolve().parents[1])
EXIT_UNAVAILABLE, EXIT_NOPERM, EXIT_CONFIG = 69, 77, 78
VIOLATION = re.compile(r"(Publish|Subscription|Permissions) Violation")
CLI_TIMEOUT = 25.0  # a hung command fails the test instead of hanging it
CONNECT_TIMEOUT = 3  # NATS_CONNECT_TIMEOUT for everything here
INGRESS = f"{WORKER_NAME}.jobs.{JOB_TYPE}"
# Lane timings that make a route switch and the old lane's retirement take about a second.
FAST = {
    "HEARTBEAT_INTERVAL": "0.3",
    "INSTANCE_TTL": "1.5",
    "RETIRE_GRACE": "0.3",
    "ROUTE_CHECK_INTERVAL": "2",
}
# Distinctive fake secrets: any appearance in any output is a leak.
PASSWORD = "pw-Qz7LeakCanary-31"  # noqa: S105
TOKEN = "tok-Vb3LeakCanary-82"  # noqa: S105
WRONG_PASSWORD = "pw-Wr0ngCanary-55"  # noqa: S105


# ------------------------------------------------------------------------------------ servers


@dataclass
class Server:
    """``nats-server -c <file>``: JetStream on a free loopback port, plus ``body`` config."""

    workdir: Path
    body: str
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"nats-server-{self.port}.log"

    def url(self, scheme: str = "nats", userinfo: str = "", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{host}:{self.port}"

    def start(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"nats-server-{self.port}.conf"
        store = self.workdir / f"store-{self.port}"
        conf.write_text(
            "\n".join(
                [
                    f"listen: 127.0.0.1:{self.port}",
                    "jetstream {",
                    f"  store_dir: {json.dumps(str(store))}",
                    "}",
                    self.body,
                    "",
                ]
            ),
            encoding="utf-8",
        )
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nats-server exited {proc.returncode}:\n{self.log()}")
            return port_open(self.port) and "Server is ready" in self.log()

        wait_until(up, 15, f"nats-server on {self.port}", details=self.log)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def violations(self) -> list[str]:
        """The server's log lines about refused publishes and subscriptions."""
        return [line for line in self.log().splitlines() if VIOLATION.search(line)]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``servers(body, env=...)`` starts a configured server; all are stopped at the end."""
    started: list[Server] = []

    def start(body: str, env: Mapping[str, str] | None = None) -> Server:
        server = Server(tmp_path / "servers", body, dict(env or {}))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------------------------ the worker


@dataclass
class Outputs:
    """Everything any command of a test printed, to search for leaked secrets."""

    texts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, text: str) -> None:
        self.texts.append((what, text))

    def hits(self, secret: str) -> list[str]:
        return [what for what, text in self.texts if secret in text]


class Worker:
    """The worker's CLI and ``run`` processes against one server, with one test's settings."""

    def __init__(self, workdir: Path, env: Mapping[str, str], outputs: Outputs) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.outputs = outputs
        self.procs: list[WorkerProcess] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def environ(self, **overrides: object) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARS}
        env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH", "")) if p
        )
        env.update(
            {
                "HEALTH_PORT": "0",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
                "NATS_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
                "DRAIN_TIMEOUT": "5",
                "BACKOFF": "0.1",
            }
        )
        env.update(self.env)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def cli(self, *args: str, **env: object) -> subprocess.CompletedProcess[str]:
        """``python -m <package> ARGS``; a command still running after CLI_TIMEOUT fails."""
        started = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, "-m", PACKAGE, "--app", "demo", *args],
                env=self.environ(**env),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=CLI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            err = (exc.stderr or b"").decode(errors="replace").splitlines()
            self.outputs.add(f"{args} (hung)", "\n".join(err))
            pytest.fail(
                f"'{' '.join(args)}' still running after {CLI_TIMEOUT:g}s "
                f"(NATS_CONNECT_TIMEOUT={CONNECT_TIMEOUT}); last stderr lines:\n"
                + "\n".join(err[-3:]),
                pytrace=False,
            )
        out = subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )
        self.outputs.add(f"{' '.join(args)} ({time.monotonic() - started:.1f}s)", out.stdout)
        self.outputs.add(f"{' '.join(args)} stderr", out.stderr)
        return out

    def ok(self, *args: str, **env: object) -> str:
        result = self.cli(*args, **env)
        assert result.returncode == 0, (
            f"{args} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result.stdout

    def spawn(self, name: str = "worker", /, **env: object) -> WorkerProcess:
        log_path = self.workdir / f"{name}-{len(self.procs) + 1}.log"
        proc = WorkerProcess(self.environ(**env), log_path, self.workdir)
        self.procs.append(proc)
        return proc.start().wait_ready()

    def close(self) -> None:
        for proc in self.procs:
            proc.close()
            with contextlib.suppress(OSError):
                self.outputs.add(f"{proc.log_path.name}", proc.log_path.read_text(errors="replace"))


@pytest.fixture
def outputs() -> Outputs:
    return Outputs()


@pytest.fixture
def workers(tmp_path: Path, outputs: Outputs) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(name: str = "w", **env: str) -> Worker:
        worker = Worker(tmp_path / f"{name}-{len(made) + 1}", env, outputs)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


def one_line_error(result: subprocess.CompletedProcess[str], *codes: int) -> str:
    """The operator contract: a documented exit code, one stderr line, no traceback."""
    assert result.returncode in codes, (
        f"exit {result.returncode}, expected one of {codes}\nstderr:\n{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr[-3000:]}"
    assert lines[0].startswith(f"{WORKER_NAME}: error: "), lines[0]
    return lines[0]


def full_life(worker: Worker, job_id: str, **env: object) -> None:
    """provision, run, publish a job, see it done, drain on SIGTERM (exit 0)."""
    assert "stream" in worker.ok("provision", **env)
    proc = worker.spawn(LOG_LEVEL="DEBUG", **env)
    assert "published 1 job(s)" in worker.ok("publish", json.dumps({"id": job_id}), **env)
    proc.wait_done([job_id])
    assert proc.stop() == 0, proc.tail()
    assert not proc.non_json_lines(), proc.non_json_lines()


# ------------------------------------------------------------------------------------ credentials


def new_nkey(prefix: int) -> tuple[str, str]:
    """(seed, public key) of a fresh NKey: prefix is nkeys.PREFIX_BYTE_USER, _ACCOUNT, ..."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return bytes(seed).decode(), bytes(pair.public_key).decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(claims: Mapping[str, object], issuer_seed: str) -> str:
    """A NATS JWT (header ``ed25519-nkey``) signed by ``issuer_seed``, as nsc would write it."""
    pair = nkeys.from_seed(bytearray(issuer_seed.encode()))
    body: dict[str, object] = {
        **claims,
        "iss": bytes(pair.public_key).decode(),
        "iat": int(time.time()),
        "jti": "",
    }
    digest = hashlib.sha512(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest[:32]).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = pair.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(bytes(signature))}"


UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


def user_creds(account_seed: str) -> str:
    """A ``.creds`` file's text: a user JWT issued by the account, and the user's seed."""
    seed, public = new_nkey(nkeys.PREFIX_BYTE_USER)
    user = {
        "sub": public,
        "name": WORKER_NAME,
        "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, **UNLIMITED},
    }
    token = sign_jwt(user, account_seed)
    return "\n".join(
        [
            "-----BEGIN NATS USER JWT-----",
            token,
            "------END NATS USER JWT------",
            "",
            "************************* IMPORTANT *************************",
            "NKEY Seed printed below can be used to sign and prove identity.",
            "",
            "-----BEGIN USER NKEY SEED-----",
            seed,
            "------END USER NKEY SEED------",
            "",
        ]
    )


def operator_mode(workdir: Path) -> tuple[str, str, str]:
    """(server config body, good creds text, creds text of an account the server never heard of)."""
    workdir.mkdir(parents=True, exist_ok=True)
    op_seed, op_public = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    _sys_seed, sys_public = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    acc_seed, acc_public = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    stranger_seed, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    operator = sign_jwt(
        {
            "sub": op_public,
            "name": "TEST_OPERATOR",
            "nats": {"type": "operator", "version": 2, "system_account": sys_public},
        },
        op_seed,
    )
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    account = sign_jwt(
        {
            "sub": acc_public,
            "name": "APP",
            "nats": {"type": "account", "version": 2, "limits": {**UNLIMITED, **jetstream}},
        },
        op_seed,
    )
    system = sign_jwt(
        {
            "sub": sys_public,
            "name": "SYS",
            "nats": {"type": "account", "version": 2, "limits": UNLIMITED},
        },
        op_seed,
    )
    (workdir / "operator.jwt").write_text(operator, encoding="utf-8")
    body = "\n".join(
        [
            f"operator: {json.dumps(str(workdir / 'operator.jwt'))}",
            f"system_account: {sys_public}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {acc_public}: {json.dumps(account)}",
            f"  {sys_public}: {json.dumps(system)}",
            "}",
        ]
    )
    return body, user_creds(acc_seed), user_creds(stranger_seed)


@dataclass
class Credentials:
    """One way to log in: the server's config, what the worker is given, and a wrong variant."""

    server: str
    good: dict[str, str]
    wrong: dict[str, str]
    secrets: list[str]


def credentials(kind: str, workdir: Path) -> Credentials:
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "user-password":
        return Credentials(
            'authorization { users = [ { user: "worker", password: "' + PASSWORD + '" } ] }',
            {"NATS_USER": "worker", "NATS_PASSWORD": PASSWORD},
            {"NATS_USER": "worker", "NATS_PASSWORD": WRONG_PASSWORD},
            [PASSWORD, WRONG_PASSWORD],
        )
    if kind == "token":
        return Credentials(
            'authorization { token: "' + TOKEN + '" }',
            {"NATS_TOKEN": TOKEN},
            {"NATS_TOKEN": "tok-" + WRONG_PASSWORD},
            [TOKEN, WRONG_PASSWORD],
        )
    if kind in ("nkey-seed", "nkey-seed-file"):
        seed, public = new_nkey(nkeys.PREFIX_BYTE_USER)
        other_seed, _ = new_nkey(nkeys.PREFIX_BYTE_USER)
        if kind == "nkey-seed":
            good, wrong = {"NATS_NKEY_SEED": seed}, {"NATS_NKEY_SEED": other_seed}
        else:
            (workdir / "user.nk").write_text(seed + "\n", encoding="utf-8")
            (workdir / "other.nk").write_text(other_seed + "\n", encoding="utf-8")
            good = {"NATS_NKEY_SEED_FILE": str(workdir / "user.nk")}
            wrong = {"NATS_NKEY_SEED_FILE": str(workdir / "other.nk")}
        return Credentials(
            "authorization { users = [ { nkey: " + public + " } ] }", good, wrong, [seed]
        )
    assert kind == "creds"
    body, good_creds, wrong_creds = operator_mode(workdir)
    (workdir / "worker.creds").write_text(good_creds, encoding="utf-8")
    (workdir / "stranger.creds").write_text(wrong_creds, encoding="utf-8")
    seeds = [line for line in good_creds.splitlines() if line.startswith("SU")]
    return Credentials(
        body,
        {"NATS_CREDS": str(workdir / "worker.creds")},
        {"NATS_CREDS": str(workdir / "stranger.creds")},
        seeds,
    )


# ------------------------------------------------------------------------------------ tests: auth


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["user-password", "token", "nkey-seed", "nkey-seed-file", "creds"])
def test_each_credential_kind_works_and_a_wrong_secret_is_refused(
    kind: str,
    tmp_path: Path,
    servers: Callable[..., Server],
    workers: Callable[..., Worker],
    outputs: Outputs,
) -> None:
    creds = credentials(kind, tmp_path / "creds")
    server = servers(creds.server)
    worker = workers(NATS_URL=server.url(), **creds.good)

    full_life(worker, f"{kind}-1")
    anonymous = worker.cli("status", **{name: None for name in creds.good})
    one_line_error(anonymous, EXIT_NOPERM)

    started = time.monotonic()
    refused = worker.cli("provision", **creds.wrong)
    took = time.monotonic() - started
    line = one_line_error(refused, EXIT_NOPERM)
    assert "credentials" in line
    assert took < CONNECT_TIMEOUT + 6, f"refusal took {took:.1f}s"
    for secret in creds.secrets:
        assert not outputs.hits(secret), f"{kind} secret printed by {outputs.hits(secret)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["nkey-seed", "nkey-seed-file", "creds"])
def test_malformed_key_material_is_a_one_line_config_error(
    kind: str, tmp_path: Path, servers: Callable[..., Server], workers: Callable[..., Worker]
) -> None:
    """A seed or creds file that is not one: one line naming the setting, never a traceback."""
    server = servers("authorization { token: " + json.dumps(TOKEN) + " }")
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("SUthis-is-not-a-seed-" + PASSWORD + "\n", encoding="utf-8")
    env = {
        "nkey-seed": {"NATS_NKEY_SEED": "SUthis-is-not-a-seed-" + PASSWORD},
        "nkey-seed-file": {"NATS_NKEY_SEED_FILE": str(garbage)},
        "creds": {"NATS_CREDS": str(garbage)},
    }[kind]
    worker = workers(NATS_URL=server.url(), **env)
    # 78 (configuration) fits best; 77 (refused) is acceptable once a server has judged it.
    line = one_line_error(worker.cli("status"), EXIT_CONFIG, EXIT_NOPERM)
    assert "NATS_" in line
    assert PASSWORD not in line


# ------------------------------------------------------------------------------------ tests: TLS


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(workdir: Path) -> Pki:
    workdir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def base(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        base(name(f"{WORKER_NAME} test CA"), name(f"{WORKER_NAME} test CA"), ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            base(name(common_name), ca_cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert: x509.Certificate = builder.sign(ca_key, hashes.SHA256())
        return cert, key

    def write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            key_path = path.with_name(path.stem + "-key.pem")
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            key_path.chmod(0o600)

    pki = Pki(
        workdir / "ca.pem",
        workdir / "server.pem",
        workdir / "server-key.pem",
        workdir / "client.pem",
        workdir / "client-key.pem",
    )
    write(pki.ca, ca_cert, None)
    write(pki.server_cert, *leaf("nats-server", server=True))
    write(pki.client_cert, *leaf(WORKER_NAME, server=False))
    return pki


def tls_block(pki: Pki, verify: bool) -> str:
    return "\n".join(
        [
            "tls {",
            f"  cert_file: {json.dumps(str(pki.server_cert))}",
            f"  key_file: {json.dumps(str(pki.server_key))}",
            f"  ca_file: {json.dumps(str(pki.ca))}",
            f"  verify: {'true' if verify else 'false'}",
            "  timeout: 2",
            "}",
        ]
    )


@pytest.mark.timeout(60)
def test_tls_with_a_private_ca(
    tmp_path: Path, servers: Callable[..., Server], workers: Callable[..., Worker]
) -> None:
    pki = make_pki(tmp_path / "pki")
    server = servers(tls_block(pki, verify=False))
    worker = workers(NATS_URL=server.url("tls"), NATS_TLS_CA=str(pki.ca))

    full_life(worker, "tls-1")
    assert "ingress" in worker.ok("status", "--json", NATS_URL=server.url("tls", host="localhost"))

    # The server's certificate is not trusted without the CA: a clear TLS failure, not a hang.
    for url in (server.url("tls"), server.url("nats")):
        line = one_line_error(
            worker.cli("status", NATS_URL=url, NATS_TLS_CA=None), EXIT_UNAVAILABLE
        )
        assert "TLS" in line, line


@pytest.mark.timeout(60)
def test_mutual_tls_needs_the_client_certificate(
    tmp_path: Path, servers: Callable[..., Server], workers: Callable[..., Worker]
) -> None:
    pki = make_pki(tmp_path / "pki")
    server = servers(tls_block(pki, verify=True))
    worker = workers(
        NATS_URL=server.url("tls"),
        NATS_TLS_CA=str(pki.ca),
        NATS_TLS_CERT=str(pki.client_cert),
        NATS_TLS_KEY=str(pki.client_key),
    )

    full_life(worker, "mtls-1")

    started = time.monotonic()
    refused = worker.cli("status", NATS_TLS_CERT=None, NATS_TLS_KEY=None)
    line = one_line_error(refused, EXIT_UNAVAILABLE, EXIT_NOPERM)
    assert "TLS" in line, line
    assert time.monotonic() - started < CONNECT_TIMEOUT + 6
    # Half a key pair is a configuration error, named before anything connects.
    half = worker.cli("status", NATS_TLS_KEY=None)
    assert "NATS_TLS_KEY" in one_line_error(half, EXIT_CONFIG)


# ------------------------------------------------------------------------------------ tests: scope

ADMIN_PASSWORD = "admin-pw-not-a-canary"  # noqa: S105
OTHER_STREAM = "OTHER_WORKER"
OTHER_ROOT = "other-worker"


def least_privilege_server(servers: Callable[..., Server], worker: Worker, workdir: Path) -> Server:
    """The worker's user exactly as ``permissions`` prints it, plus an unrestricted admin user
    (the tests' own setup and inspection) spliced into the same ``users`` list."""
    conf = worker.ok("permissions", WORKER_NATS_PASSWORD=PASSWORD)
    assert "$WORKER_NATS_PASSWORD" in conf
    assert PASSWORD not in conf
    marker = "  users = [\n"
    assert conf.count(marker) == 1, conf
    admin = "    { user: admin, password: " + json.dumps(ADMIN_PASSWORD) + " }\n"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "worker-permissions.conf").write_text(
        conf.replace(marker, marker + admin), encoding="utf-8"
    )
    return servers('include "worker-permissions.conf"', env={"WORKER_NATS_PASSWORD": PASSWORD})


async def admin_connect(server: Server) -> Client:
    return await asyncio.wait_for(
        nats.connect(
            server.url(),
            user="admin",
            password=ADMIN_PASSWORD,
            allow_reconnect=False,
            connect_timeout=2,
        ),
        timeout=10,
    )


def dlq_seqs(worker: Worker) -> list[int]:
    entries = json.loads(worker.ok("dlq", "list", "--json"))
    return [int(e["dlq_seq"]) for e in entries if e["reason"] == "invalid"]


def permission_lines(proc: WorkerProcess) -> list[str]:
    return [
        str(r.get("msg"))
        for r in proc.records()
        if "permission" in str(r.get("msg", "")).lower()
        or "authorization" in str(r.get("msg", "")).lower()
    ]


@pytest.mark.timeout(90)
def test_least_privilege_user_lives_a_whole_worker_life_without_a_violation(
    tmp_path: Path, servers: Callable[..., Server], workers: Callable[..., Worker]
) -> None:
    worker = workers(NATS_USER=WORKER_NAME, NATS_PASSWORD=PASSWORD, **FAST)
    server = least_privilege_server(servers, worker, tmp_path / "servers")
    worker.env["NATS_URL"] = server.url()

    assert "created stream" in worker.ok("provision")
    v1 = worker.spawn("v1", LOG_LEVEL="DEBUG")
    worker.ok("publish", json.dumps({"id": "lp-1"}))
    worker.ok("publish", "--raw", "this is not a job")
    v1.wait_done(["lp-1"])
    first = wait_until(lambda: dlq_seqs(worker), 15, "the invalid payload in the DLQ")

    status = json.loads(worker.ok("status", "--json"))
    assert status["current_lane"] == "v1"
    assert [lane["instances"] for lane in status["lanes"] if lane["lane"] == "v1"] == [1]
    assert STREAM_NAME in worker.ok("status")
    assert "invalid" in worker.ok("dlq", "list")
    assert "replayed 1 job(s)" in worker.ok("dlq", "replay", "--seq", str(first[0]))
    # The replayed payload is still not a job: it comes back as a new entry.
    wait_until(
        lambda: [s for s in dlq_seqs(worker) if s > first[0]], 15, "the replay dead-lettered again"
    )

    v2 = worker.spawn("v2", LANE="v2", LOG_LEVEL="DEBUG")
    assert "new work -> v2 100%" in worker.ok("route", "v2", "--note", "least privilege")
    assert v1.wait_exit(30) == 0, v1.tail()  # retired: its lane was routed away and is drained
    assert v1.with_msg("stopped ("), v1.tail()
    worker.ok("publish", json.dumps({"id": "lp-2"}))
    v2.wait_done(["lp-2"])
    assert "v2" in worker.ok("route")
    assert "purged" in worker.ok("dlq", "purge", "--yes")
    assert v2.stop() == 0, v2.tail()  # drained on SIGTERM

    assert server.violations() == [], "\n".join(server.violations())
    for proc in (v1, v2):
        assert permission_lines(proc) == [], proc.tail()
        assert not proc.non_json_lines(), proc.non_json_lines()


@pytest.mark.timeout(90)
def test_least_privilege_user_is_refused_outside_its_own_scope(
    tmp_path: Path, servers: Callable[..., Server], workers: Callable[..., Worker]
) -> None:
    worker = workers(NATS_USER=WORKER_NAME, NATS_PASSWORD=PASSWORD)
    server = least_privilege_server(servers, worker, tmp_path / "servers")
    worker.env["NATS_URL"] = server.url()
    worker.ok("provision")

    async def scenario() -> dict[str, str]:
        admin = await admin_connect(server)
        try:
            ajs = admin.jetstream()
            await ajs.add_stream(StreamConfig(name=OTHER_STREAM, subjects=[f"{OTHER_ROOT}.>"]))
            settings = load_settings(
                _env_file=None,
                nats_url=[server.url()],
                nats_user=WORKER_NAME,
                nats_password=PASSWORD,
                nats_connect_timeout=CONNECT_TIMEOUT,
            )
            nc = await connect(settings)  # the chassis' own connection (private inbox prefix)
            outcomes: dict[str, str] = {}
            try:
                js = nc.jetstream(timeout=1.0)
                attempts = {
                    "create": js.add_stream(
                        StreamConfig(name=f"{OTHER_STREAM}_2", subjects=["sneaky.>"])
                    ),
                    "info": js.stream_info(OTHER_STREAM),
                    "publish": js.publish(f"{OTHER_ROOT}.jobs.x", b'{"id": "stolen"}'),
                    "delete": js.delete_stream(OTHER_STREAM),
                }
                for what, attempt in attempts.items():
                    try:
                        await attempt
                    except Exception as exc:
                        outcomes[what] = type(exc).__name__
                    else:
                        outcomes[what] = "ALLOWED"
                await nc.publish(f"{OTHER_ROOT}.jobs.x", b"core publish")
                await nc.subscribe(f"{OTHER_ROOT}.>")
                await nc.subscribe("_INBOX.>")  # everyone's replies
                await nc.flush(timeout=2)
            finally:
                await nc.close()
            info = await ajs.stream_info(OTHER_STREAM)
            outcomes["other stream messages"] = str(info.state.messages)
            names = [s.config.name for s in await ajs.streams_info()]
            outcomes["sneaky stream exists"] = str(f"{OTHER_STREAM}_2" in names)
            return outcomes
        finally:
            await admin.close()

    outcomes = asyncio.run(scenario())
    assert "ALLOWED" not in outcomes.values(), outcomes
    assert outcomes["other stream messages"] == "0", outcomes
    assert outcomes["sneaky stream exists"] == "False", outcomes
    denied = "\n".join(server.violations())
    for kind, subject in (
        ("Publish", f"$JS.API.STREAM.CREATE.{OTHER_STREAM}_2"),
        ("Publish", f"$JS.API.STREAM.INFO.{OTHER_STREAM}"),
        ("Publish", f"$JS.API.STREAM.DELETE.{OTHER_STREAM}"),
        ("Publish", f"{OTHER_ROOT}.jobs.x"),
        ("Subscription", f"{OTHER_ROOT}.>"),
        ("Subscription", "_INBOX.>"),
    ):
        expected = f'{kind} Violation - Subject "{subject}"'
        assert expected in denied, f"{expected!r} not in the server log:\n{denied}"

    # The worker's own CLI pointed at another worker's stream: refused, one line, exit 77.
    other = {
        "STREAM_NAME": OTHER_STREAM,
        "DLQ_STREAM_NAME": f"{OTHER_STREAM}_DLQ",
        "SUBJECT_ROOT": OTHER_ROOT,
    }
    for command in (["status"], ["provision"]):  # each waits for the request to time out
        started = time.monotonic()
        line = one_line_error(worker.cli(*command, **other), EXIT_NOPERM)
        assert "permission" in line.lower(), line
        assert time.monotonic() - started < 15, f"{command} took too long to be refused"


# ------------------------------------------------------------------------------------ tests: leaks


@pytest.mark.timeout(120)
def test_secrets_never_appear_in_any_output(
    tmp_path: Path,
    servers: Callable[..., Server],
    workers: Callable[..., Worker],
    outputs: Outputs,
) -> None:
    """Every command, in success and in failure, with distinctive secrets: zero hits."""
    seed, public = new_nkey(nkeys.PREFIX_BYTE_USER)
    stranger_seed, _ = new_nkey(nkeys.PREFIX_BYTE_USER)  # valid, but unknown to the server
    server = servers(
        "authorization { users = [ "
        + '{ user: "worker", password: "'
        + PASSWORD
        + '" }, { nkey: '
        + public
        + " } ] }"
    )
    worker = workers(NATS_URL=server.url(), NATS_USER="worker", NATS_PASSWORD=PASSWORD, **FAST)
    anonymous: dict[str, object] = {"NATS_USER": None, "NATS_PASSWORD": None}
    in_url = {"NATS_URL": server.url(userinfo=f"worker:{PASSWORD}"), **anonymous}
    with_seed = {"NATS_NKEY_SEED": seed, **anonymous}

    # Success paths, at DEBUG where that changes anything.
    worker.ok("provision", LOG_LEVEL="DEBUG")
    proc = worker.spawn(LOG_LEVEL="DEBUG")
    worker.ok("publish", json.dumps({"id": "leak-1"}), LOG_LEVEL="DEBUG")
    worker.ok("publish", "--raw", "not a job", **in_url)
    proc.wait_done(["leak-1"])
    wait_until(lambda: dlq_seqs(worker), 15, "the invalid payload in the DLQ")
    for args in (
        ["status"],
        ["status", "--json"],
        ["dlq", "list"],
        ["dlq", "list", "--json"],
        ["route"],
        ["route", "--json"],
    ):
        worker.ok(*args, LOG_LEVEL="DEBUG")
    worker.ok("status", "--json", **in_url)
    worker.ok("status", **with_seed)
    by_url = worker.spawn("by-url", LOG_LEVEL="DEBUG", **in_url)
    assert "route already is v1 100%" in worker.ok("route", "v1", **with_seed)
    assert by_url.stop() == 0
    assert proc.stop() == 0
    assert "$WORKER_NATS_PASSWORD" in worker.ok("permissions", WORKER_NATS_PASSWORD=PASSWORD)

    # Failure paths: bad configuration, refused credentials, nothing listening.
    closed = f"worker:{PASSWORD}@127.0.0.1:1"
    quick = {"NATS_CONNECT_TIMEOUT": "1"}  # nothing listens there: no need to wait long
    failures: list[tuple[list[str], dict[str, object], tuple[int, ...]]] = [
        (["run"], {"CONCURRENCY": "0"}, (EXIT_CONFIG,)),
        (["run"], {"NATS_URL": f"nats://worker:{PASSWORD}@127.0.0.1:notaport"}, (EXIT_CONFIG,)),
        (["status"], {"NATS_USER": None}, (EXIT_CONFIG,)),  # a password without a user
        (["status"], {"NATS_PASSWORD": WRONG_PASSWORD}, (EXIT_NOPERM,)),
        (["status"], {"NATS_TOKEN": TOKEN, **anonymous}, (EXIT_NOPERM,)),
        (["status"], {**with_seed, "NATS_NKEY_SEED": stranger_seed}, (EXIT_NOPERM,)),
        (["status"], {"NATS_URL": f"nats://{closed}", **anonymous, **quick}, (EXIT_UNAVAILABLE,)),
        (["run"], {"NATS_URL": f"nats://{closed}", **anonymous, **quick}, (EXIT_UNAVAILABLE,)),
        (["dlq", "list"], {"NATS_URL": f"nats://{closed}", **quick}, (EXIT_UNAVAILABLE,)),
    ]
    for args, env, codes in failures:
        result = worker.cli(*args, **env)
        assert result.returncode in codes, (args, env.keys(), result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr

    for secret in (PASSWORD, WRONG_PASSWORD, TOKEN, seed, seed[2:20], stranger_seed):
        hits = outputs.hits(secret)
        assert not hits, f"a secret ({secret[:6]}...) was printed by: {hits}"
    assert len(outputs.texts) > 40  # the search covered every command and worker log
