#!/usr/bin/env bash
# Install Debian's nats-server for the NATS bus tests (tests/test_bus.py, the replica tests).
#
# Does nothing when nats-server is already on PATH (or $SLED_NATS_SERVER exists).
# Needs root (CI runs as root); without root it says so and exits 0, and the
# NATS tests then skip with one clear reason. Only Debian's package archive.
set -euo pipefail

NATS="${SLED_NATS_SERVER:-nats-server}"

if command -v "$NATS" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-nats.sh: nats-server is missing and this is not root;" \
         "skipping (the NATS tests will be skipped). As root: apt-get install nats-server" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-nats.sh: nats-server is missing and there is no apt-get;" \
         "skipping (the NATS tests will be skipped)" >&2
    exit 0
fi
echo "install-nats.sh: installing Debian's nats-server (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends nats-server; } >&2; then
    echo "install-nats.sh: apt-get could not install nats-server;" \
         "the NATS tests will be skipped" >&2
    exit 0
fi
nats-server --version >&2 || true
