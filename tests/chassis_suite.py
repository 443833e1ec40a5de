"""The chassis's full test suite lives in ``chassis_tests/`` and runs against baked projects.

A generated repository keeps only its user's tests and a compact contract check; the chassis's
own suite (unit, integration, chaos, about 8,000 lines) is the template's business. It is written
for one baked project: :func:`render_chassis_suite` renders its Jinja (the package name) into
``<project>/tests/chassis/`` of a project baked with the same answers.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined

REPO_ROOT = Path(__file__).resolve().parents[1]
CHASSIS_TESTS = REPO_ROOT / "chassis_tests"
SUBDIR = Path("tests") / "chassis"


def render_chassis_suite(project: Path, cookiecutter: Mapping[str, Any]) -> Path:
    """Copy the chassis suite into ``project`` with its Jinja rendered; returns its directory."""
    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)  # noqa: S701 - Python source, not HTML
    target = project / SUBDIR
    if target.exists():
        shutil.rmtree(target)
    for source in sorted(CHASSIS_TESTS.rglob("*")):
        if "__pycache__" in source.parts or source.is_dir():
            continue
        dest = target / source.relative_to(CHASSIS_TESTS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_text("utf-8")
        if "{{" in text or "{%" in text:
            text = env.from_string(text).render(cookiecutter=cookiecutter)
        dest.write_text(text, "utf-8")
    return target


if __name__ == "__main__":  # scripts/dev-bake: python tests/chassis_suite.py PROJECT
    import json
    import sys

    project = Path(sys.argv[1])
    # the answers the project was baked with (its replay file), derived names included
    answers = json.loads((project / ".cookiecutter.json").read_text("utf-8"))["cookiecutter"]
    print(render_chassis_suite(project, answers))
