#!/usr/bin/env bash
# Developer helper: render the template (with the chassis suite in tests/chassis), run ruff format
# + safe fixes on the rendered project, and copy the results back into the template: files with
# no Jinja as they are, and files whose only Jinja is the package name with it put back.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
cookiecutter --no-input "$root" -o "$out" worker_name=order-processor >/dev/null
gen=$out/order-processor
python "$root/tests/chassis_suite.py" "$gen" >/dev/null
(cd "$gen" && { ruff check -q --fix . >/dev/null 2>&1 || true; ruff format -q .; ruff check -q --fix . >/dev/null 2>&1 || true; })
python - "$root" "$gen" <<'PY'
import sys
from pathlib import Path

root, gen = Path(sys.argv[1]), Path(sys.argv[2])
tpl = root / "{{cookiecutter.worker_name}}"
PKG = "{{ cookiecutter.__package_name }}"
for f in sorted(gen.rglob("*.py")):
    rel = f.relative_to(gen)
    if rel.parts[:2] == ("tests", "chassis"):
        t = root / "chassis_tests" / Path(*rel.parts[2:])
    else:
        t = tpl / Path(*(p.replace("order_processor", "{{cookiecutter.__package_name}}") for p in rel.parts))
    if not t.is_file():
        continue
    old, new = t.read_text(), f.read_text()
    if "{{" in old or "{%" in old:
        if old.replace(PKG, "") .count("{{") or "{%" in old:
            continue  # other Jinja: format it by hand
        new = new.replace("order_processor", PKG)
    if new != old:
        t.write_text(new)
        print("formatted", t.relative_to(root))
PY
rm -rf "$out"
