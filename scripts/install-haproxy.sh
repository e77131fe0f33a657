#!/usr/bin/env bash
# Install Debian's haproxy (2.6) for the replica tests behind a load balancer (tests/support/haproxy.py)
# and scripts/cluster.sh.
#
# Does nothing when haproxy is already on PATH (or $SLED_HAPROXY exists).
# Needs root (CI runs as root); without root it says so and exits 0, and the
# HAProxy tests then skip with one clear reason. Only Debian's package archive.
set -euo pipefail

HAPROXY="${SLED_HAPROXY:-haproxy}"

if command -v "$HAPROXY" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-haproxy.sh: haproxy is missing and this is not root;" \
         "skipping (the HAProxy tests will be skipped). As root: apt-get install haproxy" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-haproxy.sh: haproxy is missing and there is no apt-get;" \
         "skipping (the HAProxy tests will be skipped)" >&2
    exit 0
fi
echo "install-haproxy.sh: installing Debian's haproxy (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy; } >&2; then
    echo "install-haproxy.sh: apt-get could not install haproxy;" \
         "the HAProxy tests will be skipped" >&2
    exit 0
fi
haproxy -v >&2 || true
