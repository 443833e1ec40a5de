"""The workers under test, and the generated projects they come from.

Adding a variant is one more :class:`Spec` in :func:`specs`. Each spec says how to start the
worker against a server URL, and may say why it has to be skipped on this checkout.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .procs import clean_env, free_port

BENCH_DIR = Path(__file__).resolve().parent.parent
WORKERS_DIR = BENCH_DIR / "workers"
PY = sys.executable
WORKER_NAME = "bench-worker"
PACKAGE = "bench_worker"

# Tracing is switched on by the standard OTEL_* variables (runtime/observe/telemetry_config.py):
# traces over OTLP/HTTP when an endpoint is set. Metrics stay off (OTEL_METRICS_EXPORTER=none): this
# measures tracing. Hook: if the worker ever needs an extra switch of its own (e.g. TRACING=on),
# put it in TRACING_SWITCH_ENV; nothing else changes. The variant skips itself, with a note, on a
# checkout whose worker has no runtime/observe/telemetry.py.
TRACING_SWITCH_ENV: dict[str, str] = {}
TRACING_MODULE = f"{PACKAGE}.runtime.observe.telemetry"


def tracing_env(endpoint: str | None = None) -> dict[str, str]:
    """Tracing on. Without ``endpoint``: OTLP to a closed loopback port (nothing listens; every
    export is refused and retried), as the benchmark issue asks. With it: a live collector."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint or f"http://127.0.0.1:{free_port()}",
        "OTEL_SERVICE_NAME": WORKER_NAME,
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        **TRACING_SWITCH_ENV,
    }


@dataclass
class Topology:
    """Names the generated worker provisions, read from its own ``status --json``."""

    stream: str = "BENCH_WORKER"
    ingress: str = "bench-worker.jobs.bench"
    durable: str = "bench-worker-v1"
    lane: str = "v1"
    lane_filter: str = "bench-worker.v1.>"


@dataclass
class Project:
    """A generated copy of the template (``src`` goes first on the worker's PYTHONPATH)."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "src"

    def env(self, url: str, **extra: str) -> dict[str, str]:
        return clean_env(
            {"NATS_URL": url, "HEALTH_PORT": "0", "PYTHONPATH": str(self.src), **extra}
        )

    def cli(self, *args: str) -> list[str]:
        return [PY, "-m", PACKAGE, *args]

    def run_cli(
        self, url: str, *args: str, timeout: float = 60.0, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cli(*args),
            env=self.env(url, **extra),
            cwd=self.root.parent,  # an empty directory: no stray .env is read
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def importable(self, module: str) -> bool:
        out = subprocess.run(
            [PY, "-c", f"import {module}"],
            env=clean_env({"PYTHONPATH": str(self.src)}),
            capture_output=True,
            timeout=60,
        )
        return out.returncode == 0

    def has_command(self, *args: str) -> bool:
        out = subprocess.run(
            self.cli(*args, "--help"),
            env=clean_env({"PYTHONPATH": str(self.src), "HEALTH_PORT": "0"}),
            capture_output=True,
            timeout=60,
        )
        return out.returncode == 0

    def extras(self) -> list[str]:
        text = (self.root / "pyproject.toml").read_text()
        block = re.search(r"\[project\.optional-dependencies\](.*?)(\n\[|\Z)", text, re.S)
        return re.findall(r"^(\w[\w-]*)\s*=", block.group(1), re.M) if block else []


def generate(template: Path, out: Path) -> Project:
    """Render the template (working tree, as checked out) into ``out/bench-worker``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run(
        [PY, "-m", "cookiecutter", "--no-input", str(template), "-o", str(out),
         f"worker_name={WORKER_NAME}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return precompiled(Project(out / WORKER_NAME))


def precompiled(project: Project) -> Project:
    """Byte-compile the project's sources, as installing the image's wheel does: otherwise the
    first run of each worker compiles them at start-up, which costs ~1.3 MB of peak RSS (run 0
    peaked at 40.7-42.9 MB, the later runs at 39.3-41.6) and start-up time no image pays."""
    subprocess.run(
        [PY, "-m", "compileall", "-q", str(project.src)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return project


def install(project: Project, stamp: Path) -> str:
    """``pip install -e`` the project: its version metadata decides the default lane, and the
    console script exists. The worker still imports from ``src`` first (PYTHONPATH), so a stale
    install of another copy cannot be measured by mistake. Skipped when this very path is
    installed already with an identical pyproject (``stamp`` keeps the last one installed)."""
    pyproject = (project.root / "pyproject.toml").read_text()
    check = subprocess.run(
        [PY, "-c", f"import importlib.metadata as m; print(m.distribution({WORKER_NAME!r})"
         ".read_text('direct_url.json'))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if (
        check.returncode == 0
        and project.root.as_uri() in check.stdout
        and stamp.exists()
        and stamp.read_text() == pyproject
    ):
        return "already installed -e"
    extras = [e for e in project.extras() if re.search(r"trac|otel|telemetry", e)]
    target = f"{project.root}[{','.join(extras)}]" if extras else str(project.root)
    subprocess.run(
        [PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", target],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    stamp.write_text(pyproject)
    return f"installed -e {target}"


def bench_copy(project: Project, out: Path) -> Project:
    """A copy of the generated project whose handler.py records handler-start times (see
    workers/latency_handler.py). Only the handler differs; the chassis is the one under test."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(project.root, out / project.root.name)
    copy = Project(out / project.root.name)
    shutil.copyfile(WORKERS_DIR / "latency_handler.py", copy.src / PACKAGE / "handler.py")
    return precompiled(copy)


def io_copy(project: Project, out: Path) -> Project:
    """A copy of the generated project whose handler.py only awaits ``BENCH_IO_SLEEP_S`` seconds
    (see workers/io_handler.py): an I/O-bound job that does not depend on the template's job
    fields. Only the handler differs; the chassis is the one under test."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(project.root, out / project.root.name)
    copy = Project(out / project.root.name)
    shutil.copyfile(WORKERS_DIR / "io_handler.py", copy.src / PACKAGE / "handler.py")
    return precompiled(copy)


def job_fields(project: Project) -> list[str] | None:
    """The fields of the generated project's ``Job`` (the user's ``job.py``, not the chassis),
    so the harness sends only fields the model accepts; None if it cannot be read."""
    out = subprocess.run(
        [PY, "-c", f"import json; from {PACKAGE}.job import Job; print(json.dumps(list("
         "Job.model_fields)))"],
        env=clean_env({"PYTHONPATH": str(project.src)}), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    try:
        return [str(f) for f in json.loads(out.stdout)]
    except ValueError:
        return None


def read_topology(project: Project, url: str) -> Topology:
    """Provisioned names, as the worker's ``status --json`` reports them (defaults otherwise)."""
    topo = Topology()
    out = project.run_cli(url, "status", "--json")
    if out.returncode != 0:
        return topo
    report = json.loads(out.stdout)
    topo.stream = report.get("stream", topo.stream)
    topo.ingress = report.get("ingress", topo.ingress)
    current = report.get("current_lane") or topo.lane
    for lane in report.get("lanes", []):
        if lane.get("lane") == current:
            topo.lane, topo.durable = current, lane.get("consumer", topo.durable)
            topo.lane_filter = lane.get("filter", topo.lane_filter)
    return topo


@dataclass
class Spec:
    key: str
    label: str
    argv: list[str]
    env: Callable[[str], dict[str, str]]  # server URL -> environment
    cwd: Path
    skip: str | None = None  # why this worker cannot run on this checkout


def specs(
    gen: Project,
    lat: Project,
    topo: Topology,
    cwd: Path,
    *,
    latency_dir: Path | None = None,
    otlp_sink: str | None = None,
    lean_credit: int = 100,
) -> list[Spec]:
    """The workers under test. ``latency_dir`` selects the recording variants (latency runs):
    each writes ``<latency_dir>/<key>.txt``; the generated worker then runs the bench copy.
    ``lean_credit``: the lean loop's pull window; keep it equal to the generated worker's
    default window (min(CONCURRENCY, FETCH_BATCH) = 100). With quick jobs the worker also
    prefetches up to CONCURRENCY more, so ``lean-nats-py-2x`` (twice the credit) is the
    like-for-like floor for no-op jobs."""
    project = lat if latency_dir is not None else gen

    def rec(key: str) -> dict[str, str]:
        if latency_dir is None:
            return {}
        return {"BENCH_LATENCY_OUT": str(latency_dir / f"{key}.txt")}

    def lean(key: str, credit: int, what: str) -> Spec:
        """The lean loop (workers/lean_worker.py) with a pull window of ``credit``."""
        return Spec(
            key,
            what,
            [PY, str(WORKERS_DIR / "lean_worker.py")],
            lambda url: clean_env({"NATS_URL": url, **common, "CREDIT": str(credit), **rec(key)}),
            cwd,
        )

    common = {
        "STREAM_NAME": topo.stream,
        "DURABLE": topo.durable,
        "SUBJECT_FILTER": topo.lane_filter,
        "FETCH_BATCH": "100",
    }
    tracing_skip = None
    if not gen.importable(TRACING_MODULE):
        tracing_skip = (
            f"skipped: the generated worker has no tracing support yet ({TRACING_MODULE} "
            "does not import)"
        )
    return [
        Spec(
            "generated",
            "generated worker (no-op handler, defaults)",
            project.cli("run"),
            lambda url: project.env(url, **rec("generated")),
            cwd,
        ),
        Spec(
            "generated+metrics",
            "generated worker, metrics on (PROMETHEUS_METRICS=true, the /metrics reader; "
            "HEALTH_PORT=0 so nothing scrapes: the per-job recording cost)",
            project.cli("run"),
            lambda url: project.env(url, **rec("generated+metrics"), PROMETHEUS_METRICS="true"),
            cwd,
        ),
        Spec(
            "generated+asyncio",
            "generated worker on plain asyncio (EVENT_LOOP=asyncio; the default is uvloop)",
            project.cli("run"),
            lambda url: project.env(url, **rec("generated+asyncio"), EVENT_LOOP="asyncio"),
            cwd,
        ),
        Spec(
            "generated+tracing",
            "generated worker, tracing on (OTLP to a closed port)",
            project.cli("run"),
            lambda url: project.env(url, **rec("generated+tracing"), **tracing_env()),
            cwd,
            skip=tracing_skip,
        ),
        Spec(
            "generated+tracing+sink",
            "generated worker, tracing on, OTLP to a live (do-nothing) collector",
            project.cli("run"),
            lambda url: project.env(url, **rec("generated+tracing+sink"), **tracing_env(otlp_sink)),
            cwd,
            skip=tracing_skip or (None if otlp_sink else "skipped: no OTLP sink running"),
        ),
        Spec(
            "generated+tracing+sink+10%",
            "generated worker, tracing on to a live collector, 10% of traces sampled "
            "(OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG 0.1)",
            project.cli("run"),
            lambda url: project.env(
                url,
                **rec("generated+tracing+sink+10%"),
                **tracing_env(otlp_sink),
                OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                OTEL_TRACES_SAMPLER_ARG="0.1",
            ),
            cwd,
            skip=tracing_skip or (None if otlp_sink else "skipped: no OTLP sink running"),
        ),
        lean(
            "lean-nats-py",
            lean_credit,
            f"lean nats-py (the floor): callback inbox, pull "
            f"requests kept outstanding (credit {lean_credit}, refilled at half), status "
            "messages return credit, one ack per message, uvloop",
        ),
        lean(
            "lean-nats-py-2x",
            2 * lean_credit,
            f"the lean loop with credit {2 * lean_credit}: "
            "the generated worker's largest window for quick jobs (CONCURRENCY slots plus a "
            "prefetch of up to CONCURRENCY)",
        ),
        Spec(
            "raw-nats-py",
            "raw nats-py: fetch(100) + ack, uvloop",
            [PY, str(WORKERS_DIR / "raw_worker.py")],
            lambda url: clean_env({"NATS_URL": url, **common, **rec("raw-nats-py")}),
            cwd,
        ),
        Spec(
            "faststream",
            "FastStream 0.7 PullSub(batch_size=100), per message, logging off",
            [PY, "-m", "faststream", "run", "faststream_worker:app"],
            lambda url: clean_env(
                {"NATS_URL": url, "PYTHONPATH": str(WORKERS_DIR), **common, **rec("faststream")}
            ),
            cwd,
        ),
    ]
