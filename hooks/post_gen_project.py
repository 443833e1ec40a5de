"""Remove the files of options that were answered 'no'. Nothing else happens here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

INCLUDE_KUBERNETES = json.loads(r'''{{ cookiecutter.include_kubernetes | tojson }}''')
INCLUDE_GITHUB_ACTIONS = json.loads(r'''{{ cookiecutter.include_github_actions | tojson }}''')


def remove_kubernetes_files(root: Path) -> None:
    shutil.rmtree(root / "deploy" / "kubernetes", ignore_errors=True)


def remove_github_actions_files(root: Path) -> None:
    shutil.rmtree(root / ".github", ignore_errors=True)


def main(root: Path) -> None:
    if INCLUDE_KUBERNETES != "yes":
        remove_kubernetes_files(root)
    if INCLUDE_GITHUB_ACTIONS != "yes":
        remove_github_actions_files(root)


if __name__ == "__main__":
    main(Path.cwd())
