"""Validate every template answer before anything is written.

Answers are read as JSON data (``tojson``), never pasted into code, so an answer such as
``"; import os`` is just a bad string. A failed check prints one line naming the answer and the
fix, and exits 1; cookiecutter then removes the half-made project, so nothing is left on disk.
"""

from __future__ import annotations

import json
import keyword
import re
import sys

ANSWERS: dict[str, str] = {
    "worker_name": json.loads(r'''{{ cookiecutter.worker_name | tojson }}'''),
    "description": json.loads(r'''{{ cookiecutter.description | tojson }}'''),
    "subject_root": json.loads(r'''{{ cookiecutter.subject_root | tojson }}'''),
    "job_type": json.loads(r'''{{ cookiecutter.job_type | tojson }}'''),
    "python_version": json.loads(r'''{{ cookiecutter.python_version | tojson }}'''),
    "author_name": json.loads(r'''{{ cookiecutter.author_name | tojson }}'''),
    "author_email": json.loads(r'''{{ cookiecutter.author_email | tojson }}'''),
    "include_kubernetes": json.loads(r'''{{ cookiecutter.include_kubernetes | tojson }}'''),
    "include_github_actions": json.loads(r'''{{ cookiecutter.include_github_actions | tojson }}'''),
}

# Patterns are used with fullmatch: a `$` anchor would also accept a trailing newline.
# kebab-case: lowercase words of letters/digits joined by single hyphens, starting with a letter.
WORKER_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
# One NATS subject token we are willing to build subjects from: no whitespace, no wildcards, no
# separators, nothing the server or a shell would treat specially.
SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
PYTHON_VERSION = re.compile(r"^3\.(1[1-9]|[2-9][0-9])$")
# An address as packaging metadata accepts it (RFC 5322 dot-atom local part @ a dotted domain);
# anything else makes `pip install` of the generated project fail later, far from the cause.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
RESERVED_TOKENS = {"jobs", "dlq", "hb", "route"}
# The package is worker_name with '_' for '-'. It must import as itself: a keyword is a syntax
# error, and a standard-library module or a dependency's package would shadow it or be shadowed.
TAKEN_PACKAGE_NAMES = set(getattr(sys, "stdlib_module_names", ())) | {
    "nats", "pydantic", "pydantic_settings", "uvloop", "opentelemetry", "prometheus_client",
    "pytest", "testcontainers", "docker",
}  # fmt: skip


def check(answers: dict[str, str]) -> list[str]:
    """Return one message per bad answer; an empty list means every answer is usable."""
    errors: list[str] = []
    name = answers["worker_name"]
    package = name.replace("-", "_")
    if not WORKER_NAME.fullmatch(name) or len(name) > 48:
        errors.append(
            f"worker_name {name!r} is not kebab-case: use lowercase letters, digits and single "
            "hyphens, starting with a letter, at most 48 characters (e.g. order-processor)"
        )
    elif keyword.iskeyword(package) or package in TAKEN_PACKAGE_NAMES:
        errors.append(
            f"worker_name {name!r} would make the Python package {package!r}, which is a "
            "keyword or clashes with a standard-library or dependency module: pick another "
            "name (e.g. add a word: order-queue)"
        )
    for key in ("subject_root", "job_type"):
        token = answers[key]
        if not SUBJECT_TOKEN.fullmatch(token):
            errors.append(
                f"{key} {token!r} is not a valid NATS subject token: use letters, digits, '-' or "
                "'_' only (no spaces, '.', '*' or '>')"
            )
    if answers["job_type"] in RESERVED_TOKENS:
        errors.append(f"job_type {answers['job_type']!r} is reserved: pick another name")
    if not PYTHON_VERSION.fullmatch(answers["python_version"]):
        errors.append(
            f"python_version {answers['python_version']!r} is not supported: use 3.11 or newer, "
            "as MAJOR.MINOR (e.g. 3.11)"
        )
    for key in ("include_kubernetes", "include_github_actions"):
        if answers[key] not in ("yes", "no"):
            errors.append(f"{key} {answers[key]!r} must be 'yes' or 'no'")
    for key in ("description", "author_name", "author_email"):
        if any(ch in answers[key] for ch in "\r\n\x00"):
            errors.append(f"{key} must be a single line of text")
    email = answers["author_email"]
    if not EMAIL.fullmatch(email) or len(email) > 254:
        errors.append(
            f"author_email {email!r} is not an email address: use one like you@example.com "
            "(no spaces, no quotes or display name, one '@', a dotted domain)"
        )
    if not answers["description"].strip():
        errors.append("description is empty: write one sentence about what the worker does")
    return errors


def main() -> int:
    errors = check(ANSWERS)
    if errors:  # the first problem only: later ones often follow from it (derived defaults)
        print(f"ERROR: {errors[0]}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
