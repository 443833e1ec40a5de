"""The generated ``scripts/check-update``: leftovers of a template update are reported.

The real thing (a conflicting ``cruft update``) is in tests/test_template_update.py; these are
the fast cases, on a fresh project without git.
"""

from __future__ import annotations

import subprocess
import sys

from .conftest import BakedProject, Baker


def check(baked: BakedProject) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/check-update"],
        cwd=baked.path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_fresh_project_is_clean(bake: Baker) -> None:
    result = check(bake())
    assert result.returncode == 0, result.stdout + result.stderr


def test_conflict_markers_and_rejected_hunks_are_reported(bake: Baker) -> None:
    baked = bake.fresh()
    pyproject = baked.path / "pyproject.toml"
    text = pyproject.read_text("utf-8")
    pyproject.write_text(
        text.replace(
            '    "pydantic>=2.7,<3",\n',
            '<<<<<<< ours\n    "pydantic>=2.9,<3",\n=======\n    "pydantic>=2.8,<3",\n'
            ">>>>>>> theirs\n",
        ),
        "utf-8",
    )
    (baked.path / "Dockerfile.rej").write_text("@@ -1 +1 @@\n-a\n+b\n", "utf-8")
    # a Markdown heading underline is not a conflict
    (baked.path / "NOTES.md").write_text("Notes!!\n=======\n", "utf-8")

    result = check(baked)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("pyproject.toml:") for line in lines), lines
    assert any(line.startswith("Dockerfile.rej:") for line in lines), lines
    assert not any("NOTES.md" in line for line in lines), lines
    assert lines[-1].startswith("check-update: 2 file(s)"), lines
