#!/usr/bin/env bash
# Set up .venv (first run only) and start the uplink with the given options.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >&2
exec .venv/bin/python run_uplink.py "$@"
