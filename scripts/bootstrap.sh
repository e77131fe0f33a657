#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the extras named in
# $1 (comma-separated, e.g. "test"), at the versions pinned in constraints.txt
# (the ones the test suite last passed with). Idempotent; safe on a fresh clone.
#
# The project is installed as a regular (not editable) package: setuptools
# warns on every editable install of a flat layout, and the tests and
# run_*.py import the working tree first anyway. It is reinstalled whenever a
# source file is newer than the last install, so the console scripts
# (sled-uplink, sled-gateway) never run stale code.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras:-core}"
constraints=()
[ -f constraints.txt ] && constraints=(--constraint constraints.txt)
newer=""
if [ -f "$stamp" ]; then
    newer=$(find pyproject.toml constraints.txt run_uplink.py run_gateway.py \
        protocol actors sled_gateway demo -newer "$stamp" -type f \
        \( -name '*.py' -o -name '*.html' -o -name '*.toml' -o -name '*.txt' \) \
        -print -quit 2>/dev/null || true)
fi
if [ ! -f "$stamp" ] || [ -n "$newer" ]; then
    pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
    "${pip[@]}" install "${constraints[@]}" --upgrade pip >&2
    spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    "${pip[@]}" install "${constraints[@]}" "$spec" >&2
    touch "$stamp"
fi
