"""The generated project's container image, built and run for real.

One image is built per session (``built_image``) from a default project and reused by every test.
Each test gets its own nats-server container; the worker containers join its network namespace
(``--network container:<nats>``), so everything talks over that namespace's loopback only: no
published ports, no host ports to collide with, nothing reachable from outside. Commands run
inside the worker container (``docker exec <worker> <worker-name> publish|status|health``) with
the same CLI and environment an operator would use.

Needs a Docker-compatible engine (``container`` marker: skips locally without one, fails under
CI=true). Here that is podman serving the Docker API (shared/tools/container-engine.sh): images
are local only, nothing is pulled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import pytest

from .conftest import BakedProject, Baker, ContainerEngine

pytestmark = pytest.mark.container

NATS_IMAGE = os.environ.get("NATS_IMAGE", "docker.io/library/nats:2")
DRAIN_TIMEOUT = 10.0  # seconds the worker may spend finishing running jobs after SIGTERM
LONG_JOB_SECONDS = 3.0
UID = "10001"  # the Dockerfile's USER


def _engine_cli() -> list[str]:
    """The docker CLI, else podman (both talk to the same engine here)."""
    for name in ("docker", "podman"):
        if shutil.which(name):
            return [name]
    pytest.fail("neither the docker nor the podman CLI is on PATH", pytrace=False)


def _run(
    cmd: Sequence[str], *, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited {result.returncode}\n--- stdout ---\n{result.stdout}"
            f"\n--- stderr ---\n{result.stderr}",
            pytrace=False,
        )
    return result


def wait_for(what: str, probe: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    """Poll ``probe`` until it is true; fail with ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(interval)


@dataclass
class Engine:
    cli: list[str]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run([*self.cli, *args], timeout=timeout, check=check)

    @cached_property
    def is_podman(self) -> bool:
        """Podman behind the Docker API (the docker CLI's `version` names the server)."""
        if self.cli[0] == "podman":
            return True
        out = self("version", "--format", "{{.Server.Os}} {{json .Server.Components}}", check=False)
        return "podman" in out.stdout.lower()

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "--format", template, name).stdout.strip()

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr


@dataclass
class Image:
    tag: str
    project: BakedProject
    build_output: str


@pytest.fixture(scope="session")
def engine(container_engine: ContainerEngine) -> Engine:
    return Engine(_engine_cli())


def build_image(engine: Engine, project: BakedProject, tag: str) -> str:
    """`docker build` the project (podman: Docker format, which keeps HEALTHCHECK)."""
    fmt = ["--format", "docker"] if engine.cli[0] == "podman" else []
    result = engine(
        "build",
        *fmt,
        "--build-arg",
        f"PYTHON_VERSION={project.context['python_version']}",
        "-t",
        tag,
        str(project.path),
        timeout=600,
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def built_image(engine: Engine, bake: Baker) -> Iterator[Image]:
    project = bake()
    tag = f"localhost/{project.worker_name}-test:{uuid.uuid4().hex[:8]}"
    output = build_image(engine, project, tag)
    try:
        yield Image(tag=tag, project=project, build_output=output)
    finally:
        engine("rmi", "-f", tag, check=False)


@dataclass
class Stack:
    """A nats-server container and the worker containers sharing its network namespace."""

    engine: Engine
    image: Image
    prefix: str = field(default_factory=lambda: f"shiptest-{uuid.uuid4().hex[:8]}")
    workers: list[str] = field(default_factory=list)
    nats: str = ""

    @property
    def worker_cmd(self) -> str:
        return self.image.project.worker_name

    def start_nats(self) -> None:
        self.nats = f"{self.prefix}-nats"
        self.engine(
            "run", "-d", "--name", self.nats, "--network", "none",
            NATS_IMAGE, "-js", "-sd", "/data", "-a", "127.0.0.1", "-m", "8222",
        )  # fmt: skip
        wait_for(
            "nats-server to be ready",
            lambda: "Server is ready" in self.engine.logs(self.nats),
            timeout=20,
        )

    def start_worker(self, *args: str, env: dict[str, str] | None = None, network: str = "") -> str:
        """Start a worker container; ``args`` replace the image's CMD (``run``)."""
        name = f"{self.prefix}-worker{len(self.workers) + 1}"
        self.workers.append(name)
        settings = {"NATS_URL": "nats://127.0.0.1:4222", "LOG_FORMAT": "json", **(env or {})}
        env_args = [arg for key, value in settings.items() for arg in ("-e", f"{key}={value}")]
        self.engine(
            "run", "-d", "--name", name,
            "--network", network or f"container:{self.nats}",
            *env_args, self.image.tag, *args,
        )  # fmt: skip
        return name

    def cli(self, worker: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the worker's CLI inside ``worker`` (same environment as the running worker)."""
        return self.engine("exec", worker, self.worker_cmd, *args, timeout=60, check=check)

    def readyz(self, worker: str) -> tuple[bool, dict[str, object]]:
        """`<worker> health` inside the container: (ready, the /readyz body)."""
        result = self.cli(worker, "health", check=False)
        match = re.search(r"\{.*\}", result.stdout)
        body = json.loads(match.group(0)) if match else {}
        return result.returncode == 0, body

    def wait_ready(self, worker: str, timeout: float = 45) -> None:
        def ready() -> bool:
            if self.engine.inspect(worker, "{{.State.Running}}") != "true":
                pytest.fail(f"{worker} exited early:\n{self.engine.logs(worker)}", pytrace=False)
            return self.readyz(worker)[0]

        wait_for(f"{worker} to be ready (GET /readyz)", ready, timeout=timeout, interval=0.3)

    def status(self, worker: str) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.cli(worker, "status", "--json").stdout)
        return data

    def remove_all(self) -> None:
        for name in self.workers:  # workers first: they live in the nats container's namespace
            self.engine("rm", "-f", name, check=False)
        if self.nats:
            self.engine("rm", "-f", self.nats, check=False)


@pytest.fixture
def stack(engine: Engine, built_image: Image) -> Iterator[Stack]:
    stack = Stack(engine, built_image)
    try:
        stack.start_nats()
        yield stack
    finally:
        stack.remove_all()


def _stopped_line(logs: str) -> str:
    lines = [line for line in logs.splitlines() if "stopped (" in line]
    assert lines, f"no 'stopped (...)' line in the worker's log:\n{logs}"
    return lines[-1]


# ----------------------------------------------------------------------------------- tests


def test_image_metadata(engine: Engine, built_image: Image) -> None:
    tag, worker = built_image.tag, built_image.project.worker_name
    assert json.loads(engine.inspect(tag, "{{json .Config.Entrypoint}}")) == [worker]
    assert json.loads(engine.inspect(tag, "{{json .Config.Cmd}}")) == ["run"]
    assert engine.inspect(tag, "{{.Config.StopSignal}}") == "SIGTERM"
    assert engine.inspect(tag, "{{.Config.User}}") == f"{UID}:{UID}"
    if engine.is_podman:  # podman's Docker API leaves the healthcheck out of `docker inspect`
        raw = _run(["podman", "image", "inspect", "--format", "{{json .HealthCheck}}", tag])
    else:
        raw = engine("image", "inspect", "--format", "{{json .Config.Healthcheck}}", tag)
    healthcheck = json.loads(raw.stdout)
    assert healthcheck, "the image has no HEALTHCHECK (built without the Docker format?)"
    assert healthcheck["Test"] == ["CMD", worker, "health"], healthcheck


def test_runs_as_non_root(engine: Engine, built_image: Image) -> None:
    out = engine("run", "--rm", "--network", "none", "--entrypoint", "id", built_image.tag)
    assert re.search(rf"uid={UID}\b", out.stdout), out.stdout
    assert re.search(rf"gid={UID}\b", out.stdout), out.stdout
    assert "uid=0" not in out.stdout


def test_runtime_stage_has_no_build_tools(engine: Engine, built_image: Image) -> None:
    probe = (
        "import importlib.util as u, shutil;"
        "print(sorted(m for m in ('pip', 'setuptools', 'hatchling') if u.find_spec(m)),"
        "sorted(t for t in ('gcc', 'cc', 'make') if shutil.which(t)))"
    )
    out = engine(
        "run", "--rm", "--network", "none", "--entrypoint", "python", built_image.tag, "-c", probe
    )
    assert out.stdout.strip() == "[] []", f"build tooling left in the runtime image: {out.stdout}"


def test_code_change_reuses_the_dependency_layer(
    engine: Engine, bake: Baker, built_image: Image
) -> None:
    """Editing src/ rebuilds only the project layer: dependencies come from the build cache
    (warmed by the session's build of an identical pyproject.toml)."""
    project = bake.fresh()
    handler = project.path / "src" / project.package_name / "handler.py"
    # A unique edit: the engine's layer cache outlives this run, and a fixed edit built once
    # before (an earlier run on the same machine) would come from the cache.
    nonce = uuid.uuid4().hex[:8]
    handler.write_text(handler.read_text("utf-8") + f"\n# edited {nonce}\n", encoding="utf-8")
    tag = f"localhost/{project.worker_name}-cachetest:{nonce}"
    try:
        output = build_image(engine, project, tag)
    finally:
        engine("rmi", "-f", tag, check=False)
    steps = _build_steps(output)
    deps = [s for s in steps if "requirements.txt" in s[0] and "install" in s[0]]
    project_step = [s for s in steps if "--no-deps" in s[0]]
    assert deps, f"dependency step not recognised:\n{output}"
    assert project_step, f"project step not recognised:\n{output}"
    assert all(cached for _, cached in deps), f"dependencies were reinstalled:\n{output}"
    assert not any(cached for _, cached in project_step), f"project not rebuilt:\n{output}"


def _build_steps(output: str) -> list[tuple[str, bool]]:
    """(instruction, came from cache) per build step; podman/buildah and classic Docker output."""
    steps: list[tuple[str, bool]] = []
    for line in output.splitlines():
        if re.match(r"^(\[\d+/\d+\] )?STEP \d+/\d+: |^Step \d+/\d+ : ", line):
            steps.append((line, False))
        elif steps and re.search(r"Using cache", line):
            steps[-1] = (steps[-1][0], True)
    return steps


def test_processes_jobs(stack: Stack) -> None:
    worker = stack.start_worker()
    stack.wait_ready(worker)
    # Exec-form ENTRYPOINT: the worker itself is PID 1 (python running the console script).
    pid1 = stack.engine("exec", worker, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert any(part.endswith(f"/{stack.worker_cmd}") for part in pid1[:2]), pid1

    jobs = [{"id": f"job-{i}", "item": "widget", "quantity": i + 1} for i in range(5)]
    stack.cli(worker, "publish", json.dumps(jobs))

    def drained() -> bool:
        status = stack.status(worker)
        lanes = status.get("lanes") or []
        busy = any(int(lane.get("pending", 0)) or int(lane.get("unacked", 0)) for lane in lanes)
        return status.get("messages") == 0 and not busy

    wait_for("the stream to be empty (all 5 jobs acked)", drained, timeout=30, interval=0.5)
    stack.engine("stop", "-t", "30", worker, timeout=60)
    assert stack.engine.inspect(worker, "{{.State.ExitCode}}") == "0"
    stopped = _stopped_line(stack.engine.logs(worker))
    assert re.search(r"\bprocessed=5\b", stopped), stopped


def test_docker_stop_drains_a_running_job(stack: Stack) -> None:
    # The chassis's demo job: its sender says how long it runs (the user's Job cannot).
    worker = stack.start_worker("--app", "demo", "run", env={"DRAIN_TIMEOUT": f"{DRAIN_TIMEOUT:g}"})
    stack.wait_ready(worker)
    job = {"id": "long-1", "work_seconds": LONG_JOB_SECONDS}
    stack.cli(worker, "--app", "demo", "publish", json.dumps(job))
    wait_for(
        "the long job to be in flight",
        lambda: stack.readyz(worker)[1].get("in_flight") == 1,
        timeout=15,
        interval=0.2,
    )

    started = time.monotonic()
    stack.engine("stop", "-t", str(int(DRAIN_TIMEOUT * 3)), worker, timeout=DRAIN_TIMEOUT * 6)
    took = time.monotonic() - started

    logs = stack.engine.logs(worker)
    exit_code = stack.engine.inspect(worker, "{{.State.ExitCode}}")
    assert exit_code == "0", f"exit code {exit_code} (137 = killed: SIGTERM not handled)\n{logs}"
    assert took < DRAIN_TIMEOUT, f"stop took {took:.1f}s, more than DRAIN_TIMEOUT\n{logs}"
    stopped = _stopped_line(logs)
    assert "SIGTERM" in stopped, stopped
    assert re.search(r"\bprocessed=1\b", stopped), f"the running job did not finish: {stopped}"
    assert not re.search(r"\bhanded_back=[1-9]", stopped), f"the job was handed back: {stopped}"

    # The job was acknowledged: a fresh container (same network namespace) sees an empty stream.
    after = stack.engine(
        "run", "--rm", "--network", f"container:{stack.nats}",
        "-e", "NATS_URL=nats://127.0.0.1:4222", stack.image.tag, "status", "--json",
    )  # fmt: skip
    status = json.loads(after.stdout)
    assert status.get("messages") == 0, status


def test_healthcheck_reports_ready_and_not_ready(stack: Stack) -> None:
    worker = stack.start_worker()
    stack.wait_ready(worker)
    # A worker whose NATS never answers: alive (retrying), but not ready.
    lonely = stack.start_worker(
        env={"NATS_URL": "nats://127.0.0.1:1", "NATS_CONNECT_TIMEOUT": "120"}, network="none"
    )
    wait_for(f"{lonely} to answer /readyz", lambda: bool(stack.readyz(lonely)[1]), timeout=30)
    assert stack.readyz(lonely)[0] is False
    if stack.engine.is_podman:  # no systemd timers here: run the image's HEALTHCHECK on demand
        healthy = _run(["podman", "healthcheck", "run", worker], check=False)
        assert healthy.returncode == 0, f"healthy worker reported unhealthy: {healthy}"
        unhealthy = _run(["podman", "healthcheck", "run", lonely], check=False)
        assert unhealthy.returncode == 1, f"unready worker reported healthy: {unhealthy}"
    else:  # Docker runs HEALTHCHECK itself, every --interval after --start-period
        wait_for(
            "Docker to report the worker healthy",
            lambda: stack.engine.inspect(worker, "{{.State.Health.Status}}") == "healthy",
            timeout=60,
            interval=1,
        )
