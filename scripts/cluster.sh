#!/usr/bin/env bash
# A replicated gateway on this machine, in one command: set up .venv (gateway and
# cluster extras, first run only), install Debian's PostgreSQL 15, nats-server and
# HAProxy when missing (as root), then start them and three gateway replicas on
# loopback in a temporary directory; print the console URL (through HAProxy), the
# operator token and a sled command to paste. Ctrl-C stops everything and removes
# the directory. The orchestration lives in demo/cluster.py; `exec` hands it this
# process, so Ctrl-C and SIGTERM reach it directly.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SLED_CLUSTER_SKIP_BOOTSTRAP:-}" ]; then
    bash scripts/bootstrap.sh gateway,cluster >&2
    bash scripts/install-postgres.sh >&2 || true
    bash scripts/install-nats.sh >&2 || true
    bash scripts/install-haproxy.sh >&2 || true
fi
exec .venv/bin/python -m demo.cluster "$@"
