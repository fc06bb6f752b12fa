#!/usr/bin/env bash
# The two commands of the README:  ./run.sh demo   |   ./run.sh test [pytest args]
# Creates .venv from the project's own requirement files on first use (no model downloads).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.ostaf-requirements
want=$(cat requirements.txt requirements-dev.txt requirements-ldm.txt | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements-dev.txt
  .venv/bin/pip install -q --no-deps -r requirements-ldm.txt
  echo "$want" > "$stamp"
fi
cmd=${1:-}
shift || true
case "$cmd" in
  demo) exec .venv/bin/python -m lib_ostaf demo "$@" ;;
  test)
    set +e
    .venv/bin/python -m pytest -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "run.sh: pytest collected no tests" >&2; exit 1; fi
    exit "$rc"
    ;;
  lint) .venv/bin/ruff check . && exec .venv/bin/ruff format --check . ;;
  *) echo "usage: ./run.sh demo [--out DIR] | test [pytest args] | lint" >&2; exit 2 ;;
esac
