#!/usr/bin/env bash
# Developer helper: render the template, run ruff format + safe fixes on the rendered project,
# and copy the results back into the template for every file that has no Jinja in it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
cookiecutter --no-input "$root" -o "$out" worker_name=order-processor >/dev/null
gen=$out/order-processor
(cd "$gen" && ruff format -q . && ruff check -q --fix . || true)
tpl="$root/{{cookiecutter.worker_name}}"
while IFS= read -r -d '' f; do
  rel=${f#"$gen"/}
  trel=${rel//order_processor/\{\{cookiecutter.__package_name\}\}}
  t="$tpl/$trel"
  [[ -f $t ]] || continue
  grep -q -e '{{' -e '{%' "$t" && { cmp -s "$f" <(cd "$gen" && cat "$rel") || true; continue; }
  cmp -s "$f" "$t" || { cp "$f" "$t"; echo "formatted $trel"; }
done < <(find "$gen" -name '*.py' -print0)
rm -rf "$out"
