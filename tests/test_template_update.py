"""A generated project takes a chassis update from a newer template and keeps its own code.

The scenario, with real tools and real git repositories in a temporary directory:

1. the template (this repository's working tree) is committed to a scratch git repo: commit A;
2. ``cruft create`` generates a project from A; the project is committed to its own git repo;
3. the user edits ``handler.py`` (their business logic) and commits;
4. the template changes a chassis file (``runtime/consume/worker.py``): commit B;
5. ``cruft update -y`` in the project;
6. the chassis change arrived, the user's edit is intact, ``.cruft.json`` points at B, and the
   project's unit tests still pass (installed editable into a throwaway venv layered on this one).

Updating without cruft (the generated ``.cookiecutter.json`` is a replay file,
``{"cookiecutter": {...answers...}}``)::

    git status                       # commit or stash first: the merge needs a clean tree
    git -C TEMPLATE worktree add /tmp/tmpl-old OLD    # the template version you generated from
    git -C TEMPLATE worktree add /tmp/tmpl-new NEW    # the version you want
    cookiecutter --replay-file .cookiecutter.json /tmp/tmpl-old -o /tmp/old   # no prompts
    cookiecutter --replay-file .cookiecutter.json /tmp/tmpl-new -o /tmp/new
    (cd /tmp && git diff --no-index --binary old/WORKER new/WORKER) > chassis.patch
    git apply -3 -p3 chassis.patch   # 3-way merge: conflicts only where you changed the same lines
    git diff                         # review; resolve conflicts (usually only handler.py/job.py)

The patch also updates ``_template`` in ``.cookiecutter.json``, so the next update replays from
the version you are on now.

The second test below runs exactly that procedure, so this documentation cannot rot.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, requirement_name
from .uv_project import clean_env, find_python, uv_binary

pytestmark = pytest.mark.slow

WORKER = "update-probe"  # not the default name: nothing installed in this venv shadows it
PACKAGE = WORKER.replace("-", "_")
CHASSIS_FILE = Path("src", PACKAGE, "runtime", "consume", "worker.py")
TEMPLATE_CHASSIS_FILE = Path(
    "{{cookiecutter.worker_name}}",
    "src",
    "{{cookiecutter.__package_name}}",
    "runtime",
    "consume",
    "worker.py",
)
CHASSIS_MARK = "# chassis update B: the template's newer worker.py"
USER_MARK = "    # user edit: our own business rule lives here"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Template Test",
    "GIT_AUTHOR_EMAIL": "template-test@example.com",
    "GIT_COMMITTER_NAME": "Template Test",
    "GIT_COMMITTER_EMAIL": "template-test@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def run(
    cmd: Sequence[str | os.PathLike[str]],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> str:
    """Run a command; a non-zero exit fails the test with its output."""
    result = subprocess.run(
        [os.fspath(c) for c in cmd],
        cwd=cwd,
        env={**os.environ, **GIT_IDENTITY, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(map(str, cmd))}` exited {result.returncode} in {cwd}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    return result.stdout


def git(repo: Path, *args: str) -> str:
    return run(["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args], repo)


def tool(name: str) -> str:
    """A console script of this environment (cruft, cookiecutter)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed (it is in the template's test extra)"
    return found


@dataclass(frozen=True)
class Template:
    repo: Path
    commit_a: str
    commit_b: str


def copy_working_tree(dest: Path) -> None:
    """The template as it is now (tracked and new files, nothing git ignores)."""
    listed = git(REPO_ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for rel in filter(None, listed.split("\0")):
        source = REPO_ROOT / rel
        if source.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """Commit A: the template today. The chassis change B is committed by the first test."""
    repo = tmp_path_factory.mktemp("template-repo")
    copy_working_tree(repo)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "template A")
    commit_a = git(repo, "rev-parse", "HEAD").strip()
    chassis = repo / TEMPLATE_CHASSIS_FILE
    chassis.write_text(chassis.read_text(encoding="utf-8") + f"\n{CHASSIS_MARK}\n", "utf-8")
    git(repo, "commit", "-q", "-am", "template B: a chassis change")
    commit_b = git(repo, "rev-parse", "HEAD").strip()
    return Template(repo, commit_a, commit_b)


def user_edits_handler(project: Path) -> None:
    handler = project / "src" / PACKAGE / "handler.py"
    text = handler.read_text(encoding="utf-8")
    anchor = '    """Process one job. Replace the body with your own logic."""\n'
    assert anchor in text, "handler.py changed shape: update this test's anchor"
    handler.write_text(text.replace(anchor, anchor + USER_MARK + "\n"), encoding="utf-8")
    git(project, "commit", "-q", "-am", "user: our business rule")


def assert_updated(project: Path) -> None:
    assert CHASSIS_MARK in (project / CHASSIS_FILE).read_text(encoding="utf-8")
    assert USER_MARK in (project / "src" / PACKAGE / "handler.py").read_text(encoding="utf-8")
    leftovers = [p.name for p in project.rglob("*") if p.suffix in (".rej", ".orig")]
    assert not leftovers, f"merge leftovers: {leftovers}"


def unit_tests_pass(project: Path, venv: Path) -> None:
    """Install the project (editable, no dependencies) into a throwaway venv layered on this
    one, as a user's ``pip install -e .`` would, and run its unit tests there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv)
    layers = "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages())
    Path(purelib.strip(), "zz_layered_on_test_env.pth").write_text(f"import site; {layers}\n")
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
         "--disable-pip-version-check", "--no-deps", "--no-build-isolation", "--editable", project],
        project,
    )  # fmt: skip
    run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], project, timeout=600)


@pytest.mark.timeout(600)
def test_cruft_update_brings_the_chassis_change_and_keeps_the_user_edit(
    template: Template, tmp_path: Path, cookiecutter_config: Path
) -> None:
    env = {"COOKIECUTTER_CONFIG": str(cookiecutter_config)}
    context = json.dumps({"worker_name": WORKER})
    run(
        [tool("cruft"), "create", template.repo, "--no-input", "--checkout", template.commit_a,
         "--output-dir", tmp_path, "--extra-context", context],
        tmp_path,
        env,
    )  # fmt: skip
    project = tmp_path / WORKER
    assert json.loads((project / ".cruft.json").read_text())["commit"] == template.commit_a
    assert CHASSIS_MARK not in (project / CHASSIS_FILE).read_text(encoding="utf-8")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated from template A")
    user_edits_handler(project)

    run([tool("cruft"), "update", "-y", "--checkout", template.commit_b], project, env)

    assert_updated(project)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == template.commit_b
    changed = git(project, "status", "--porcelain").split("\n")
    assert any(CHASSIS_FILE.as_posix() in line for line in changed), changed
    assert not any("handler.py" in line for line in changed), changed  # untouched by the update
    unit_tests_pass(project, tmp_path / "venv")


@pytest.mark.timeout(600)
def test_the_documented_manual_merge_without_cruft_works(
    template: Template, tmp_path: Path, cookiecutter_config: Path
) -> None:
    """The docstring's procedure, step by step, on a project generated by plain cookiecutter."""
    cookiecutter = tool("cookiecutter")
    config = ["--config-file", str(cookiecutter_config)]
    old_tree, new_tree = tmp_path / "tmpl-old", tmp_path / "tmpl-new"
    git(template.repo, "worktree", "add", "-q", "--detach", str(old_tree), template.commit_a)
    git(template.repo, "worktree", "add", "-q", "--detach", str(new_tree), template.commit_b)

    run([cookiecutter, "--no-input", *config, old_tree, f"worker_name={WORKER}",
         "-o", tmp_path / "projects"], tmp_path)  # fmt: skip
    project = tmp_path / "projects" / WORKER
    replay = project / ".cookiecutter.json"
    answers = json.loads(replay.read_text(encoding="utf-8"))
    assert set(answers) == {"cookiecutter"}
    assert answers["cookiecutter"]["worker_name"] == WORKER
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated from template A")
    user_edits_handler(project)

    for tree, out in ((old_tree, tmp_path / "old"), (new_tree, tmp_path / "new")):
        run([cookiecutter, *config, "--replay-file", replay, tree, "-o", out], tmp_path)
    diff = subprocess.run(
        ["git", "diff", "--no-index", "--binary", f"old/{WORKER}", f"new/{WORKER}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert diff.returncode == 1, diff.stderr  # 1: the trees differ
    patch = tmp_path / "chassis.patch"
    patch.write_text(diff.stdout, encoding="utf-8")
    touched = {
        line.split(" b/", 1)[1]
        for line in diff.stdout.splitlines()
        if line.startswith("diff --git")
    }
    # The chassis change, and the replay file's record of which template it came from.
    expected = {CHASSIS_FILE.as_posix(), ".cookiecutter.json"}
    assert touched == {f"new/{WORKER}/{rel}" for rel in expected}, touched

    git(project, "apply", "-3", "-p3", str(patch))

    assert_updated(project)


TEMPLATE_PYPROJECT = Path("{{cookiecutter.worker_name}}", "pyproject.toml")
TEMPLATE_LINE = '    "pydantic>=2.7,<3",\n'


def check_update(project: Path) -> subprocess.CompletedProcess[str]:
    """The generated project's own conflict check, as its README tells the user to run it."""
    return subprocess.run(
        [sys.executable, "scripts/check-update"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(600)
def test_a_conflicting_update_is_detected_and_reported(
    template: Template, tmp_path: Path, cookiecutter_config: Path
) -> None:
    """A user who edits the template's own line in pyproject.toml (the chassis's list) and a
    template update of that line conflict. cruft may still say it succeeded;
    scripts/check-update must not."""
    # Template C: B plus a change to the generated pyproject.toml's dependencies.
    pyproject = template.repo / TEMPLATE_PYPROJECT
    text = pyproject.read_text(encoding="utf-8")
    assert TEMPLATE_LINE in text, "the generated pyproject.toml changed shape: update this test"
    pyproject.write_text(text.replace(TEMPLATE_LINE, '    "pydantic>=2.8,<3",\n'), "utf-8")
    git(template.repo, "commit", "-q", "-am", "template C: a dependency range moves")
    commit_c = git(template.repo, "rev-parse", "HEAD").strip()

    env = {"COOKIECUTTER_CONFIG": str(cookiecutter_config)}
    context = json.dumps({"worker_name": WORKER})
    run(
        [tool("cruft"), "create", template.repo, "--no-input", "--checkout", template.commit_a,
         "--output-dir", tmp_path, "--extra-context", context],
        tmp_path,
        env,
    )  # fmt: skip
    project = tmp_path / WORKER
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated from template A")
    clean = check_update(project)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # The user moves the same line their own way.
    ours = project / "pyproject.toml"
    ours.write_text(
        ours.read_text("utf-8").replace(TEMPLATE_LINE, '    "pydantic>=2.9,<3",\n'), "utf-8"
    )
    git(project, "commit", "-q", "-am", "user: a newer pydantic")

    update = subprocess.run(
        [tool("cruft"), "update", "-y", "--checkout", commit_c],
        cwd=project,
        env={**os.environ, **GIT_IDENTITY, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    leftovers = [p for p in project.rglob("*") if p.suffix == ".rej"]
    marked = "<<<<<<< " in ours.read_text("utf-8")
    assert leftovers or marked, (
        "the update merged cleanly, so this test no longer makes a conflict\n"
        f"{update.stdout}{update.stderr}"
    )

    result = check_update(project)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("pyproject.toml") for line in lines), result.stdout
    assert lines[-1].startswith("check-update: 1 file(s)"), result.stdout


def uv(*args: str, project: Path) -> str:
    """uv in the project, without this venv or CI=true in its environment."""
    result = subprocess.run(
        [uv_binary(), *args], cwd=project, env=clean_env(), capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"uv {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


TEMPLATE_LOCK = Path("{{cookiecutter.worker_name}}", "uv.lock")
LOCKED_PYDANTIC = '{ name = "pydantic", marker = "extra == \'chassis\'", specifier = ">=2.7,<3" }'
USER_DEPENDENCY = "iniconfig"  # in the lock already, for the dev tools only: no download


@pytest.mark.timeout(600)
def test_the_users_dependencies_survive_a_template_dependency_update(
    template: Template, tmp_path: Path, cookiecutter_config: Path
) -> None:
    """The user's list (``[project] dependencies``) and the template's (the ``chassis`` extra)
    are apart: the user's ``uv add`` and a template update that moves a chassis dependency merge
    without a conflict in pyproject.toml; uv.lock follows with one `uv lock`; the image's export
    has both."""
    # Template D, from A: a chassis dependency range moves, in pyproject.toml and in the lock
    # (the lock edit is what scripts/relock writes for this change: no locked version moves).
    tree = tmp_path / "tmpl-d"
    git(template.repo, "worktree", "add", "-q", "-b", "template-d", str(tree), template.commit_a)
    pyproject, lock = tree / TEMPLATE_PYPROJECT, tree / TEMPLATE_LOCK
    text, locked = pyproject.read_text("utf-8"), lock.read_text("utf-8")
    assert TEMPLATE_LINE in text, "the generated pyproject.toml changed shape: update this test"
    assert LOCKED_PYDANTIC in locked, "uv.lock changed shape: update this test"
    pyproject.write_text(text.replace(TEMPLATE_LINE, '    "pydantic>=2.8,<3",\n'), "utf-8")
    lock.write_text(locked.replace(LOCKED_PYDANTIC, LOCKED_PYDANTIC.replace("2.7", "2.8")), "utf-8")
    git(tree, "commit", "-q", "-am", "template D: a chassis dependency range moves")
    commit_d = git(tree, "rev-parse", "HEAD").strip()

    env = {"COOKIECUTTER_CONFIG": str(cookiecutter_config)}
    context = json.dumps({"worker_name": WORKER})
    run(
        [tool("cruft"), "create", template.repo, "--no-input", "--checkout", template.commit_a,
         "--output-dir", tmp_path, "--extra-context", context],
        tmp_path,
        env,
    )  # fmt: skip
    project = tmp_path / WORKER
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated from template A")

    # The user adds a dependency the documented way; uv writes pyproject.toml and uv.lock.
    answers = json.loads((project / ".cookiecutter.json").read_text("utf-8"))["cookiecutter"]
    python = find_python(answers["python_version"])
    uv("add", "--no-sync", "--python", python, f"{USER_DEPENDENCY}>=2,<3", project=project)
    ours = project / "pyproject.toml"
    user_line = f'    "{USER_DEPENDENCY}>=2,<3",\n'
    assert user_line in ours.read_text("utf-8")
    git(project, "commit", "-q", "-am", f"user: uv add {USER_DEPENDENCY}")

    run([tool("cruft"), "update", "-y", "--checkout", commit_d], project, env)

    # pyproject.toml merges. uv.lock may not (uv rewrote the user's, and it sorts the project's
    # own entry by its name); the README's fix: the template's lock, then `uv lock`.
    reported = check_update(project).stdout.splitlines()[:-1]
    assert all(line.startswith("uv.lock:") for line in reported), reported
    if reported:
        git(project, "checkout", "--theirs", "uv.lock")
        uv("lock", "--python", python, project=project)
    result = check_update(project)
    assert result.returncode == 0, result.stdout + result.stderr
    merged = ours.read_text("utf-8")
    assert user_line in merged, merged
    assert '    "pydantic>=2.8,<3",\n' in merged, merged
    assert TEMPLATE_LINE not in merged
    project_table = tomllib.loads(merged)["project"]
    assert f"{USER_DEPENDENCY}>=2,<3" in project_table["dependencies"]
    assert "pydantic>=2.8,<3" in project_table["optional-dependencies"]["chassis"]
    # The lock matches the merged pyproject.toml and keeps the template's new range.
    assert LOCKED_PYDANTIC.replace("2.7", "2.8") in (project / "uv.lock").read_text("utf-8")
    uv("lock", "--check", "--offline", "--python", python, project=project)
    # What the Dockerfile installs: the user's dependency and the chassis's.
    exported = uv(
        "export", "--locked", "--offline", "--no-dev", "--no-emit-project", "--no-header",
        "--no-hashes", "--python", python, project=project,
    )  # fmt: skip
    names = {requirement_name(line) for line in exported.splitlines() if line[:1].isalnum()}
    assert {USER_DEPENDENCY, "pydantic", "nats-py"} <= names, exported
    assert "pytest" not in names, exported  # --no-dev: no test tools in the image
    dockerfile = (project / "Dockerfile").read_text("utf-8")
    assert "uv export --locked --no-dev --no-emit-project" in dockerfile
