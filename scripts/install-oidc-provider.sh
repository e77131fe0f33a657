#!/usr/bin/env bash
# Install a pinned npm `oidc-provider` (panva's certified OpenID Provider) into
# .tools/oidc-provider/ for the OpenID Connect sign-in tests
# (tests/test_oidc_browser.py starts tests/oidc/provider.mjs with it).
#
# Idempotent: does nothing when the pinned version is already there. Without
# npm or node, or when the install fails, it says so and exits 0: the sign-in
# tests then skip with one clear reason.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${SLED_OIDC_PROVIDER_VERSION:-9.13.3}"
PREFIX=".tools/oidc-provider"
MARK="$PREFIX/node_modules/oidc-provider/package.json"

if [ -f "$MARK" ] && [ "$(cat "$PREFIX/.version" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "install-oidc-provider.sh: npm or node is missing; skipping" \
         "(the OpenID Connect sign-in tests will be skipped). Install nodejs and npm, then rerun." >&2
    exit 0
fi
echo "install-oidc-provider.sh: installing oidc-provider@$VERSION into $PREFIX..." >&2
mkdir -p "$PREFIX"
# --ignore-scripts: the package and its dependencies are plain JavaScript; no
# install step may run anything.
if ! npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --ignore-scripts \
        --loglevel=error "oidc-provider@$VERSION" >&2; then
    echo "install-oidc-provider.sh: npm could not install oidc-provider@$VERSION;" \
         "the OpenID Connect sign-in tests will be skipped" >&2
    exit 0
fi
echo "$VERSION" > "$PREFIX/.version"
