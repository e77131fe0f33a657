#!/usr/bin/env bash
# Install a pinned axe-core (npm package axe-core) into .tools/axe-core/ for the
# console's accessibility check (tests/test_console_layout_browser.py injects
# its axe.min.js into the page and runs it).
#
# Idempotent: does nothing when the pinned version is already there. axe-core
# is one JavaScript file with no dependencies; nothing is downloaded from
# anywhere but the npm registry. Without npm, or when the install fails, it says
# so and exits 0: the accessibility test then skips with one clear reason.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${SLED_AXE_CORE_VERSION:-4.14.1}"
PREFIX=".tools/axe-core"
AXE="$PREFIX/node_modules/axe-core/axe.min.js"

if [ -f "$AXE" ] && [ "$(cat "$PREFIX/.version" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install-axe.sh: npm is missing; skipping" \
         "(the console's accessibility test will be skipped). Install npm, then rerun." >&2
    exit 0
fi
echo "install-axe.sh: installing axe-core@$VERSION into $PREFIX..." >&2
mkdir -p "$PREFIX"
# --ignore-scripts: axe-core needs no install step, and none may run.
if ! npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --ignore-scripts \
        --loglevel=error "axe-core@$VERSION" >&2; then
    echo "install-axe.sh: npm could not install axe-core@$VERSION;" \
         "the console's accessibility test will be skipped" >&2
    exit 0
fi
if [ ! -f "$AXE" ]; then
    echo "install-axe.sh: the package has no axe.min.js;" \
         "the console's accessibility test will be skipped" >&2
    exit 0
fi
echo "$VERSION" > "$PREFIX/.version"
