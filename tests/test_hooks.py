"""The hooks: bad answers stop generation cleanly, answers are data, optional files go away.

End-to-end cases run cookiecutter (API and CLI); unit cases render a hook exactly as cookiecutter
does (``create_env_with_context``, as cookiecutter-pypackage's tests do) and import it.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cookiecutter.exceptions import FailedHookException
from cookiecutter.utils import create_env_with_context

from .conftest import HOOKS_DIR, REPO_ROOT, Baker

# (answer, bad value): each must stop generation with a message naming the answer.
BAD_ANSWERS = [
    ("worker_name", "Order Processor!"),
    ("worker_name", "1x"),
    ("worker_name", "a--b"),
    ("worker_name", ""),
    ("worker_name", "UPPER"),
    ("worker_name", "order-"),
    ("worker_name", "-order"),
    ("worker_name", "order_processor"),
    ("worker_name", "a" * 49),
    ("worker_name", "class"),  # the package would be a keyword: a syntax error to import
    ("worker_name", "queue"),  # the standard library's queue would shadow the package
    ("worker_name", "nats"),  # would clash with the nats-py client it depends on
    ("subject_root", "orders v2"),
    ("subject_root", "*"),
    ("subject_root", ">"),
    ("subject_root", "."),
    ("subject_root", "orders.v2"),
    ("job_type", "order created"),
    ("job_type", "*"),
    ("job_type", ">"),
    ("job_type", "."),
    ("job_type", "jobs"),  # reserved: <root>.jobs.jobs would be ambiguous
    ("job_type", "dlq"),
    ("python_version", "2.7"),
    ("python_version", "3.9"),
    ("python_version", "3.10"),
    ("python_version", "abc"),
    ("python_version", "3.11.4"),
    ("python_version", "3"),
    ("description", ""),
    ("description", "   "),
    ("description", "two\nlines"),
    ("author_name", "Your\rName"),
    ("author_email", "you@example.com\n"),
    # pip install of the generated project would fail on these (its metadata needs an address)
    ("author_email", "not-an-email"),
    ("author_email", ""),
    ("author_email", "you@"),
    ("author_email", "@example.com"),
    ("author_email", "you@localhost"),
    ("author_email", "Your Name <you@example.com>"),
    ("author_email", "you @example.com"),
    ("author_email", 'x"@example.com'),
    ("author_email", "a..b@example.com"),
    ("author_email", "you@example..com"),
    ("author_email", "you@-example.com"),
    ("author_email", "a@b@example.com"),
]
# Checked on the rendered hook only: `$` would let a trailing newline through a pattern.
BAD_UNIT_ONLY = [
    ("worker_name", "order\n"),
    ("python_version", "3.11\n"),
    ("subject_root", "orders\n"),
    ("author_email", "x" * 64 + "@" + ".".join(["a" * 60] * 4) + ".com"),  # longer than 254
]
GOOD_VALUES = [
    ("worker_name", "a"),
    ("worker_name", "x1-y2"),
    ("worker_name", "order-processor"),
    ("worker_name", "order-queue"),
    ("worker_name", "class-scheduler"),
    ("worker_name", "a" * 48),
    ("subject_root", "Orders_v2"),
    ("subject_root", "a-b"),
    ("job_type", "stock_level"),
    ("python_version", "3.11"),
    ("python_version", "3.12"),
    ("python_version", "3.20"),
    ("description", "Handles 'quoted' \"things\" and C:\\paths\\ safely; <b>&</b>"),
    ("author_email", "you@example.com"),
    ("author_email", "o'brien+ci@sub.example.co.uk"),
    ("author_email", "First.Last@mail-01.example.io"),
]
# Text that would run if an answer were pasted into code instead of being read as data.
PAYLOAD = "import os; os.system('touch \"$PWNED_MARKER\"')"
INJECTIONS = [
    f'"; {PAYLOAD} #',
    f"'; {PAYLOAD} #",
    f'"""; {PAYLOAD}; """',
    f"'''; {PAYLOAD}; '''",
    f"\\'''; {PAYLOAD}; #",
    '" + __import__("os").system("touch $PWNED_MARKER") + "',
]


def _ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{key}={value!r}"[:60] for key, value in cases]


def _leftovers(directory: Path) -> list[str]:
    """Files (not just empty directories) left under ``directory``."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def pwned_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where injected code would write; the payloads read it from the environment."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    return marker


# --- end to end: bad answers ---------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), BAD_ANSWERS, ids=_ids(BAD_ANSWERS))
def test_bad_answer_fails_the_hook_and_leaves_nothing(
    key: str, value: str, tmp_path: Path, bake: Baker
) -> None:
    out = tmp_path / "out"
    with pytest.raises(FailedHookException):
        bake.into(out, **{key: value})
    assert not out.exists() or not any(out.iterdir()), f"left on disk: {list(out.rglob('*'))}"


def test_reserved_job_type_derived_from_worker_name_is_caught(tmp_path: Path, bake: Baker) -> None:
    """job_type defaults to the worker name's first word; 'dlq-replayer' would make it 'dlq'."""
    out = tmp_path / "out"
    with pytest.raises(FailedHookException):
        bake.into(out, worker_name="dlq-replayer")
    assert _leftovers(out) == []


def test_worker_name_with_a_path_separator_writes_no_file(tmp_path: Path, bake: Baker) -> None:
    """cookiecutter makes the project directory before the hook runs, so 'a/b' creates out/a/
    (empty: cookiecutter removes only out/a/b). No file may be written anywhere."""
    out = tmp_path / "out"
    with pytest.raises(FailedHookException):
        bake.into(out, worker_name="a/b")
    assert _leftovers(out) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("worker_name", "Order Processor!"),
        ("subject_root", "orders.>"),
        ("job_type", "*"),
        ("python_version", "3.9"),
        ("author_email", "not-an-email"),
    ],
)
def test_cli_prints_one_error_line_naming_the_answer(
    key: str, value: str, tmp_path: Path, cookiecutter_config: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "cookiecutter", "--no-input", str(REPO_ROOT),
            "--output-dir", str(tmp_path / "out"), "--config-file", str(cookiecutter_config),
            f"{key}={value}",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    # cookiecutter adds its own "ERROR: Stopping generation because ... hook ..." and a traceback.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith("ERROR:") and "Stopping generation because" not in line
    ]
    assert len(ours) == 1, result.stdout + result.stderr
    assert ours[0].startswith(f"ERROR: {key} {value!r}"), ours[0]
    assert _leftovers(tmp_path / "out") == []


# --- end to end: answers are data, not code ------------------------------------------------


@pytest.mark.parametrize("payload", INJECTIONS)
def test_code_in_worker_name_is_rejected_not_run(
    payload: str, pwned_marker: Path, tmp_path: Path, bake: Baker
) -> None:
    out = tmp_path / "out"
    with pytest.raises(FailedHookException):
        bake.into(out, worker_name=payload)
    assert not pwned_marker.exists(), "an answer was executed as code"
    assert _leftovers(out) == []


@pytest.mark.parametrize(
    ("key", "payload"),
    [
        *itertools.product(["description"], INJECTIONS),
        ("author_name", INJECTIONS[0]),
        ("author_name", "O\"Brien \\ Co '''"),
        ("author_email", "o'brien+ci@example.com"),
        ("description", "Moves C:\\queue\\new files\\"),
    ],
)
def test_code_in_free_text_answers_stays_text(
    key: str, payload: str, pwned_marker: Path, bake: Baker
) -> None:
    """Free text is accepted, so it must come out of every generated file exactly as typed."""
    baked = bake.fresh(**{key: payload})
    assert not pwned_marker.exists(), "generation executed an answer"
    # Every Python file still parses, without invalid-escape warnings, and importing the package
    # (which runs its module-level code) runs no answer.
    for relpath in baked.files():
        if relpath.suffix == ".py":
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ast.parse(baked.read(str(relpath)), filename=str(relpath))
    probe = (
        f"import json, sys, {baked.package_name}, {baked.package_name}.runtime.names as names; "
        "json.dump({'description': names.DESCRIPTION}, sys.stdout)"
    )
    result = baked.run([sys.executable, "-c", probe], env={"PYTHONPATH": "src"})
    assert not pwned_marker.exists(), "importing the generated package executed an answer"
    if key == "description":
        assert json.loads(result.stdout)["description"] == payload
    project = tomllib.loads(baked.read("pyproject.toml"))["project"]
    recorded = {
        "description": project["description"],
        "author_name": project["authors"][0]["name"],
        "author_email": project["authors"][0]["email"],
    }
    assert recorded[key] == payload, f"pyproject.toml changed the {key} answer"


# --- unit: the rendered hooks ----------------------------------------------------------------


@pytest.fixture
def render_hook(
    tmp_path: Path, cookiecutter_context: Callable[..., dict[str, Any]]
) -> Callable[..., ModuleType]:
    """Render hooks/<name>.py with cookiecutter's own Jinja environment and import it."""
    count = itertools.count()

    def render(name: str, **answers: str) -> ModuleType:
        context = {"cookiecutter": cookiecutter_context(**answers)}
        source = (HOOKS_DIR / f"{name}.py").read_text(encoding="utf-8")
        rendered = create_env_with_context(context).from_string(source).render(**context)
        path = tmp_path / f"{name}_{next(count)}.py"
        path.write_text(rendered, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return render


@pytest.fixture
def pre_gen(render_hook: Callable[..., ModuleType]) -> ModuleType:
    return render_hook("pre_gen_project")


def test_default_answers_pass(pre_gen: ModuleType) -> None:
    assert pre_gen.check(pre_gen.ANSWERS) == []


@pytest.mark.parametrize(
    ("key", "value"), BAD_ANSWERS + BAD_UNIT_ONLY, ids=_ids(BAD_ANSWERS + BAD_UNIT_ONLY)
)
def test_check_names_the_bad_answer_first(pre_gen: ModuleType, key: str, value: str) -> None:
    errors = pre_gen.check({**pre_gen.ANSWERS, key: value})
    assert errors, f"{key}={value!r} was accepted"
    assert errors[0].startswith(key), errors
    assert len(errors[0].splitlines()) == 1, "the message must be one line"
    if key not in ("description", "author_name", "author_email"):  # free text is not echoed
        assert repr(value) in errors[0]


@pytest.mark.parametrize(("key", "value"), GOOD_VALUES, ids=_ids(GOOD_VALUES))
def test_check_accepts_good_values(pre_gen: ModuleType, key: str, value: str) -> None:
    assert pre_gen.check({**pre_gen.ANSWERS, key: value}) == []


@pytest.mark.parametrize("payload", [*INJECTIONS, "</script>\\u0027 \u00e9\u2603 {x}"])
def test_rendered_hook_reads_answers_as_data(
    render_hook: Callable[..., ModuleType], pwned_marker: Path, payload: str
) -> None:
    """The rendered hook is valid Python whatever the answer, and gets it back byte for byte."""
    module = render_hook("pre_gen_project", description=payload, author_name=payload)
    assert module.ANSWERS["description"] == payload
    assert module.ANSWERS["author_name"] == payload
    assert not pwned_marker.exists()


def test_main_prints_exactly_one_error_line(
    render_hook: Callable[..., ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    module = render_hook("pre_gen_project", worker_name="Bad Name", python_version="2.7")
    assert module.main() == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"ERROR: {module.check(module.ANSWERS)[0]}"]
    assert captured.err.startswith("ERROR: worker_name 'Bad Name'")


def test_main_is_silent_on_good_answers(
    pre_gen: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pre_gen.main() == 0
    assert capsys.readouterr() == ("", "")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("kubernetes", "github_actions"), list(itertools.product(["yes", "no"], repeat=2))
)
def test_post_gen_removes_only_the_files_of_options_answered_no(
    render_hook: Callable[..., ModuleType], tmp_path: Path, kubernetes: str, github_actions: str
) -> None:
    root = tmp_path / "project"
    files = [
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/lanes/a.yaml",
        "deploy/compose.yaml",
        ".github/workflows/ci.yml",
        "src/pkg/__init__.py",
        "README.md",
    ]
    for relpath in files:
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text("x", encoding="utf-8")
    module = render_hook(
        "post_gen_project", include_kubernetes=kubernetes, include_github_actions=github_actions
    )
    module.main(root)
    expected = [
        f
        for f in files
        if not (kubernetes == "no" and f.startswith("deploy/kubernetes/"))
        and not (github_actions == "no" and f.startswith(".github/"))
    ]
    assert _tree(root) == sorted(expected)
    assert (root / "deploy").is_dir(), "deploy/ holds more than kubernetes; it must stay"
