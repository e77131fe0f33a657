#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the extras named in
# $1 (comma-separated, e.g. "test"). Idempotent; safe on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec" >&2
    touch "$stamp"
fi
