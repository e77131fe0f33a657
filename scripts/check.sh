#!/usr/bin/env bash
# Static checks, run by .ci/run before the tests: ruff (lint and format) and
# mypy (strict, on the packages and both commands, with the cluster extra so that
# psycopg and nats-py are type-checked too). Sets up .venv like test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh gateway,cluster,test,dev >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
