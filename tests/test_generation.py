"""Generate the project for every supported combination of answers and check the result.

Modelled on cookiecutter-django's tests/test_cookiecutter_generation.py: one matrix, readable
ids, and for each combination the checks that a user would otherwise find out the hard way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cookiecutter.main import cookiecutter

from .conftest import REPO_ROOT, BakedProject, Baker, requirement_name, template_has

SUPPORTED_COMBINATIONS = [
    pytest.param({}, id="default"),
    pytest.param({"include_kubernetes": "no"}, id="include_kubernetes=no"),
    pytest.param({"include_github_actions": "no"}, id="include_github_actions=no"),
    pytest.param(
        {"include_kubernetes": "no", "include_github_actions": "no"}, id="no-optional-files"
    ),
    pytest.param(
        {"worker_name": "inventory-sync", "subject_root": "warehouse", "job_type": "stock_level"},
        id="worker_name=inventory-sync,subject_root=warehouse,job_type=stock_level",
    ),
    pytest.param(
        {"worker_name": "billing", "python_version": "3.12"},
        id="worker_name=billing,python_version=3.12",
    ),
]

# Answer -> what it adds to the generated project (removed by hooks/post_gen_project.py if 'no').
OPTIONAL_PATHS = {
    "include_kubernetes": "deploy/kubernetes",
    "include_github_actions": ".github",
}

# Jinja that survived rendering: a variable or a statement tag.
LEFTOVER_JINJA = re.compile(
    r"\{\{-?\s*cookiecutter\b"
    r"|\{%-?\s*(?:if|elif|else|endif|for|endfor|set|raw|endraw|macro|include|import|with)\b"
)


def _cookiecutter_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO_ROOT / "cookiecutter.json").read_text("utf-8"))
    return data


PUBLIC_ANSWERS = sorted(k for k in _cookiecutter_json() if not k.startswith("_"))


@pytest.fixture(params=SUPPORTED_COMBINATIONS)
def baked(request: pytest.FixtureRequest, bake: Baker) -> BakedProject:
    answers: dict[str, str] = request.param
    return bake(**answers)


def test_project_is_generated(baked: BakedProject) -> None:
    assert baked.path.name == baked.worker_name
    package = Path("src") / baked.package_name
    for relpath in (
        "pyproject.toml",
        "README.md",
        ".gitignore",
        ".cookiecutter.json",
        package / "__init__.py",
        package / "py.typed",
    ):
        assert baked.has_file(str(relpath)), f"{relpath} missing from {baked.path}"
    pyproject = tomllib.loads(baked.read("pyproject.toml"))
    assert pyproject["project"]["name"] == baked.worker_name
    assert pyproject["project"]["requires-python"] == f">={baked.context['python_version']}"
    assert baked.worker_name in pyproject["project"]["scripts"]


def test_no_jinja_left_in_files_or_names(baked: BakedProject) -> None:
    leftovers: list[str] = []
    for relpath in baked.files():
        if "{{" in str(relpath) or "}}" in str(relpath):
            leftovers.append(f"{relpath}: unrendered file name")
        try:
            text = (baked.path / relpath).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary file: nothing Jinja could have left
        for lineno, line in enumerate(text.splitlines(), 1):
            if LEFTOVER_JINJA.search(line):
                leftovers.append(f"{relpath}:{lineno}: {line.strip()}")
    assert not leftovers, "unrendered Jinja:\n" + "\n".join(leftovers)


@pytest.mark.parametrize(("answer", "relpath"), sorted(OPTIONAL_PATHS.items()))
def test_optional_files_follow_their_answer(baked: BakedProject, answer: str, relpath: str) -> None:
    expected = baked.context[answer] == "yes" and template_has(relpath)
    assert baked.has_file(relpath) == expected, (
        f"{answer}={baked.context[answer]}: {relpath} should be "
        f"{'present' if expected else 'absent'} (template has it: {template_has(relpath)})"
    )


def test_answers_are_recorded_for_replay(baked: BakedProject) -> None:
    recorded = json.loads(baked.read(".cookiecutter.json"))
    assert list(recorded) == ["cookiecutter"], "replay files hold one 'cookiecutter' object"
    answers = recorded["cookiecutter"]
    for key in PUBLIC_ANSWERS:
        assert answers.get(key) == baked.context[key], f"{key} not recorded as answered"
    leaked = {"_output_dir", "_repo_dir", "_checkout"} & set(answers)
    assert not leaked, f"machine-specific keys recorded: {leaked}"


def test_replaying_recorded_answers_reproduces_the_project(
    baked: BakedProject, tmp_path: Path, cookiecutter_config: Path
) -> None:
    replay_file = tmp_path / "answers.json"
    replay_file.write_bytes((baked.path / ".cookiecutter.json").read_bytes())
    again = Path(
        cookiecutter(
            str(REPO_ROOT),
            replay=str(replay_file),
            output_dir=str(tmp_path / "out"),
            config_file=str(cookiecutter_config),
        )
    )
    assert again.name == baked.path.name
    again_files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert again_files == baked.files()
    differ = [
        str(rel)
        for rel in again_files
        if (again / rel).read_bytes() != (baked.path / rel).read_bytes()
        or (again / rel).stat().st_mode != (baked.path / rel).stat().st_mode
    ]
    assert not differ, f"replay produced different content or modes: {differ}"


def test_generated_project_passes_ruff_and_mypy(
    baked: BakedProject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The generated project's own configuration (strict mypy, its ruff rules), run once each."""
    mypy_cache = tmp_path_factory.getbasetemp() / "mypy-cache"
    checks = {
        "ruff check": [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        "ruff format --check": [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--check",
            "--no-cache",
            ".",
        ],
        "mypy": [sys.executable, "-m", "mypy", "--cache-dir", str(mypy_cache)],
    }
    failures = []
    for name, cmd in checks.items():
        result = baked.run(cmd, check=False)
        if result.returncode != 0:
            failures.append(f"== {name} (exit {result.returncode})\n{result.stdout}{result.stderr}")
    assert not failures, "\n".join(failures)


def test_template_test_extra_installs_the_generated_projects_dependencies(
    bake: Baker,
) -> None:
    """scripts/test installs one environment for both suites; it must not miss a dependency."""
    needed = bake().requirements()
    ours = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))
    installed = {requirement_name(r) for r in ours["project"]["optional-dependencies"]["test"]}
    missing = sorted({requirement_name(r) for r in needed} - installed)
    assert not missing, f"add to [project.optional-dependencies] test in pyproject.toml: {missing}"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=" ".join)
def test_template_repository_is_ruff_clean(command: list[str]) -> None:
    """The template's own Python; the template folder is checked rendered (above)."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "hooks", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
