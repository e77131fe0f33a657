#!/usr/bin/env bash
# Install a pinned Claude Code (npm package @anthropic-ai/claude-code) into
# .tools/claude-code/ for the end-to-end tests against the real binary
# (tests/test_claude_code.py).
#
# Idempotent: does nothing when the pinned version is already there. The
# package ships its native binary inside (a per-platform optional dependency),
# so nothing is downloaded from anywhere but the npm registry. Without npm, or
# when the install fails, it says so and exits 0: the Claude Code tests then
# skip with one clear reason.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${SLED_CLAUDE_CODE_VERSION:-2.1.197}"
PREFIX=".tools/claude-code"
# The native binary, linked here once found inside the platform package.
BIN="$PREFIX/bin/claude"

if [ -x "$BIN" ] && [ "$(cat "$PREFIX/.version" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install-claude-code.sh: npm is missing; skipping" \
         "(the Claude Code tests will be skipped). Install npm, then rerun." >&2
    exit 0
fi
echo "install-claude-code.sh: installing @anthropic-ai/claude-code@$VERSION into $PREFIX..." >&2
mkdir -p "$PREFIX"
# --ignore-scripts: the binary comes in the platform package; no postinstall
# step may reach anything else.
if ! npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --ignore-scripts \
        --loglevel=error "@anthropic-ai/claude-code@$VERSION" >&2; then
    echo "install-claude-code.sh: npm could not install @anthropic-ai/claude-code@$VERSION;" \
         "the Claude Code tests will be skipped" >&2
    exit 0
fi
# The wrapper's bin/claude.exe is a placeholder that its postinstall (not run:
# --ignore-scripts) overwrites; the real binary sits in the platform package,
# e.g. node_modules/@anthropic-ai/claude-code-linux-x64/claude.
native=""
for candidate in "$PREFIX"/node_modules/@anthropic-ai/claude-code-*/claude; do
    if [ -f "$candidate" ] && [ -x "$candidate" ]; then
        native="$candidate"
        break
    fi
done
if [ -z "$native" ]; then
    echo "install-claude-code.sh: the package has no native binary for this platform;" \
         "the Claude Code tests will be skipped" >&2
    exit 0
fi
mkdir -p "$PREFIX/bin"
ln -sf "$(cd "$(dirname "$native")" && pwd)/claude" "$BIN"
echo "$VERSION" > "$PREFIX/.version"
"$BIN" --version >&2 || true
