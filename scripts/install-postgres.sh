#!/usr/bin/env bash
# Install Debian's PostgreSQL 15 for the store's PostgreSQL tests (tests/pg.py).
#
# Does nothing when its server binary already exists. Needs root (CI runs as
# root); without root it says so and exits 0, and the PostgreSQL tests then
# skip with one clear reason. Only the binaries are used: the tests run their
# own server as an unprivileged user in a temporary directory, so the
# package's own cluster is neither needed nor started.
set -euo pipefail

PG_BIN="${SLED_PG_BIN:-/usr/lib/postgresql/15/bin}"

if [ -x "$PG_BIN/postgres" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-postgres.sh: $PG_BIN/postgres is missing and this is not root;" \
         "skipping (the PostgreSQL tests will be skipped). As root: apt-get install postgresql-15" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-postgres.sh: $PG_BIN/postgres is missing and there is no apt-get;" \
         "skipping (the PostgreSQL tests will be skipped)" >&2
    exit 0
fi
echo "install-postgres.sh: installing Debian's postgresql-15 (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql-15; } >&2; then
    echo "install-postgres.sh: apt-get could not install postgresql-15;" \
         "the PostgreSQL tests will be skipped" >&2
    exit 0
fi
"$PG_BIN/postgres" --version >&2 || true
