#!/usr/bin/env bash
# Set up (.venv with the test extra) and run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh gateway,cluster,test,dev >&2
# The console's browser test drives Debian's chromium (installed if missing).
bash scripts/install-browser.sh >&2 || true
# The Matrix transport's tests run against a real Synapse, in its own venv (.tools/).
bash scripts/install-synapse.sh >&2 || true
# The NATS bus tests run a real, Debian-packaged nats-server (installed if missing).
bash scripts/install-nats.sh >&2 || true
# The replica tests and scripts/cluster.sh put Debian's HAProxy in front (installed if missing).
bash scripts/install-haproxy.sh >&2 || true
# The Claude Code tests run the real, pinned binary (npm, into .tools/).
bash scripts/install-claude-code.sh >&2 || true
# The console's accessibility check runs a pinned axe-core (npm, into .tools/).
bash scripts/install-axe.sh >&2 || true
# The OpenID Connect sign-in tests run a real OpenID Provider (npm oidc-provider, into .tools/).
bash scripts/install-oidc-provider.sh >&2 || true
# The store's PostgreSQL tests run Debian's PostgreSQL 15 (installed if missing).
bash scripts/install-postgres.sh >&2 || true
# The long runs (seeded kill runs, floods, soaks) are marked `slow` and left out unless the
# arguments choose markers themselves: CI runs them as a second pass (`-m slow`).
marker=(-m "not slow")
for arg in "$@"; do
    case "$arg" in -m|-m*) marker=() ;; esac
done
set +e
.venv/bin/python -m pytest "${marker[@]}" "$@"
status=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, loudly.
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
