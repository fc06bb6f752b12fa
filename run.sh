#!/usr/bin/env bash
# The two commands of the README:  ./run.sh demo   |   ./run.sh test [pytest args]
# Creates .venv from the project's own requirement files on first use (no model downloads);
# `test` also creates .venv-gradio3 and .venv-gradio4 (the hosts' real gradio, for
# tests/test_gradio_wiring.py), in parallel; `envs` only creates the environments.
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
gradio_env() {  # .venv-gradio$1 from requirements-gradio$1.txt, rebuilt when that changes
  local env=.venv-gradio$1 req=requirements-gradio$1.txt want
  want=$(sha256sum "$req" | cut -c1-16)
  if [ ! -x "$env/bin/python" ] || [ "$(cat "$env/.ostaf-requirements" 2>/dev/null)" != "$want" ]; then
    rm -rf "$env"
    "$PY" -m venv "$env"
    "$env/bin/pip" install -q --no-compile -r "$req"  # bytecode on first import: ~40 % faster
    echo "$want" > "$env/.ostaf-requirements"
  fi
}
gradio_envs() {
  local g3 g4 rc=0
  gradio_env 3 & g3=$!
  gradio_env 4 & g4=$!
  wait "$g3" || rc=$?
  wait "$g4" || rc=$?
  return "$rc"
}
cmd=${1:-}
shift || true
case "$cmd" in
  demo) exec .venv/bin/python -m lib_ostaf demo "$@" ;;
  envs) gradio_envs ;;
  test)
    gradio_envs
    set +e
    .venv/bin/python -m pytest -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "run.sh: pytest collected no tests" >&2; exit 1; fi
    exit "$rc"
    ;;
  lint) .venv/bin/ruff check . && exec .venv/bin/ruff format --check . ;;
  *) echo "usage: ./run.sh demo [--out DIR] | test [pytest args] | lint | envs" >&2; exit 2 ;;
esac
