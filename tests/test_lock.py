"""Reproducible builds: the generated project's bounded ranges, its committed uv.lock, Renovate.

The lock is one file for every answer (scripts/relock explains how): only the project's name and
``requires-python`` in it are Jinja. Here uv itself says the rendered lock is up to date for
several answer sets (``uv lock --check``: offline, nothing is resolved or downloaded).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .conftest import REPO_ROOT, BakedProject, Baker
from .uv_project import clean_env, find_python, uv_binary

ANSWER_SETS = [
    pytest.param({}, id="defaults"),
    pytest.param({"worker_name": "inventory-sync", "python_version": "3.12"}, id="3.12"),
    # sorts after every dependency in the lock, which uv does not mind
    pytest.param({"worker_name": "zz-last", "python_version": "3.13"}, id="3.13"),
]


def project_table(baked: BakedProject) -> dict[str, object]:
    return dict(tomllib.loads(baked.read("pyproject.toml")))


def locked_versions(baked: BakedProject) -> dict[str, str]:
    lock = tomllib.loads(baked.read("uv.lock"))
    return {p["name"]: p["version"] for p in lock["package"] if "registry" in p.get("source", {})}


@pytest.mark.parametrize("answers", ANSWER_SETS)
def test_rendered_lock_is_up_to_date(bake: Baker, answers: dict[str, str]) -> None:
    baked = bake(**answers)
    version = str(baked.context["python_version"])
    lock = tomllib.loads(baked.read("uv.lock"))
    assert lock["requires-python"] == f">={version}"
    names = {p["name"] for p in lock["package"] if p.get("source") == {"editable": "."}}
    assert names == {baked.worker_name}, names
    result = subprocess.run(
        [uv_binary(), "lock", "--check", "--offline", "--python", find_python(version)],
        cwd=baked.path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        "uv.lock does not match the generated pyproject.toml: run `bash scripts/relock`\n"
        f"{result.stdout}{result.stderr}"
    )


def test_uv_dev_group_is_the_dev_extra(bake: Baker) -> None:
    """`uv sync` installs the dev tools (the default `dev` group) that `pip install -e '.[dev]'`
    installs, from one list."""
    baked = bake()
    pyproject = project_table(baked)
    assert pyproject["dependency-groups"] == {"dev": [f"{baked.worker_name}[dev]"]}
    extras = pyproject["project"]["optional-dependencies"]  # type: ignore[index]
    assert set(extras) == {"chassis", "dev"}
    assert any(Requirement(r).name == "pytest" for r in extras["dev"])


def test_the_users_dependencies_are_a_list_of_their_own(bake: Baker) -> None:
    """`[project] dependencies` is the user's (`uv add` writes there): the template puts only a
    reference to its own list, the `chassis` extra, in it, so a template update never changes
    it, and every install of the project (uv sync, pip, the image's `uv export`) brings both."""
    baked = bake()
    project = project_table(baked)["project"]
    assert project["dependencies"] == [f"{baked.worker_name}[chassis]"]  # type: ignore[index]
    chassis = project["optional-dependencies"]["chassis"]  # type: ignore[index]
    assert {"nats-py", "pydantic", "opentelemetry-sdk"} <= {Requirement(r).name for r in chassis}
    # uv flattens the self-reference: the lock's project entry depends on the chassis's list.
    lock = tomllib.loads(baked.read("uv.lock"))
    (entry,) = [p for p in lock["package"] if p["name"] == baked.worker_name]
    assert {d["name"] for d in entry["dependencies"]} == {Requirement(r).name for r in chassis}


def test_every_dependency_has_an_upper_bound(bake: Baker) -> None:
    unbounded = [r for r in bake().requirements() if not re.search(r"<[^=]", r.split(";")[0])]
    assert not unbounded, f"add an upper bound (the lock holds exact versions): {unbounded}"


def test_nats_py_is_held_to_the_tested_minor(bake: Baker) -> None:
    """The hot path reads nats-py internals: one minor, the one the template's suites ran on."""
    baked = bake()
    (spec,) = [Requirement(r) for r in baked.requirements() if Requirement(r).name == "nats-py"]
    lower = next(Version(s.version) for s in spec.specifier if s.operator == ">=")
    upper = next(Version(s.version) for s in spec.specifier if s.operator == "<")
    assert (upper.major, upper.minor) == (lower.major, lower.minor + 1), spec
    locked = Version(locked_versions(baked)["nats-py"])
    tested = Version(importlib.metadata.version("nats-py"))
    assert locked in spec.specifier, f"uv.lock has nats-py {locked}, outside {spec}"
    assert (locked.major, locked.minor) == (tested.major, tested.minor), (
        f"uv.lock has nats-py {locked}, the template's suites run {tested}"
    )


def test_template_test_extra_uses_the_generated_ranges(bake: Baker) -> None:
    """scripts/test installs the generated project's dependencies: within the same ranges."""
    ours = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))
    listed = map(Requirement, ours["project"]["optional-dependencies"]["test"])
    test_extra = {r.name: r for r in listed}
    differ = [
        f"{r.name}: {r.specifier} here, {test_extra[r.name].specifier} in the test extra"
        for r in map(Requirement, bake().requirements())
        if r.name in test_extra and r.specifier != test_extra[r.name].specifier
    ]
    assert not differ, differ


def test_renovate_config(bake: Baker) -> None:
    baked = bake()
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.renovate", baked.path / "renovate.json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads(baked.read("renovate.json"))
    assert {"pep621", "dockerfile", "github-actions"} <= set(config["enabledManagers"])
    rules = config["packageRules"]
    (nats,) = [rule for rule in rules if "nats-py" in rule.get("matchPackageNames", [])]
    assert "needs-chassis-check" in nats["labels"]
    assert nats.get("groupName")
    assert nats["automerge"] is False
    # the Dockerfile's uv and Python minor are tracked by the custom managers
    dockerfile = baked.read("Dockerfile")
    for manager in config["customManagers"]:
        assert any(
            re.search(p.replace("(?<", "(?P<"), dockerfile) for p in manager["matchStrings"]
        ), manager


def test_image_installs_from_the_lock(bake: Baker) -> None:
    """The Dockerfile's dependency layer comes from uv.lock, which the build context keeps."""
    baked = bake()
    dockerfile = baked.read("Dockerfile")
    assert re.search(r"^COPY pyproject\.toml uv\.lock \./$", dockerfile, flags=re.M), dockerfile
    assert "uv export --locked --no-dev" in dockerfile
    assert "--require-hashes" in dockerfile
    ignored = {line.strip() for line in baked.read(".dockerignore").splitlines()}
    assert "uv.lock" not in ignored
    assert "*.lock" not in ignored
