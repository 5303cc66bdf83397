#!/usr/bin/env bash
# One entry point that sets itself up: ./dev.sh demo | ./dev.sh test [pytest args] | ./dev.sh udnc ...
# Creates .venv on first use (torch pinned to the 2.13.0 CPU build), reinstalls when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}
stamp="$VENV/.udnc-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[dev.sh] setting up $VENV (first run or pyproject.toml changed)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
  "$VENV/bin/python" -m pip install -q -e ".[test]" >&2
  rm -f "$VENV"/.udnc-setup-*
  touch "$stamp"
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/udnc" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  udnc) exec "$VENV/bin/udnc" "$@" ;;
  python) exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|udnc|python} [args]" >&2; exit 2 ;;
esac
