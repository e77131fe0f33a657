#!/usr/bin/env bash
# Install Debian's chromium for the headless console test (tests/test_console_browser.py).
#
# Does nothing when /usr/bin/chromium already exists. Needs root (CI runs as
# root); without root it says so and exits 0, and the browser test then skips
# with a clear reason. Never downloads a browser from anywhere but Debian's
# package archive (no `playwright install`).
set -euo pipefail

CHROMIUM="${SLED_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser.sh: $CHROMIUM is missing and this is not root;" \
         "skipping (the browser test will be skipped). As root: apt-get install chromium" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser.sh: $CHROMIUM is missing and there is no apt-get;" \
         "skipping (the browser test will be skipped)" >&2
    exit 0
fi
echo "install-browser.sh: installing Debian's chromium (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >&2; then
    echo "install-browser.sh: apt-get could not install chromium;" \
         "the browser test will be skipped" >&2
    exit 0
fi
"$CHROMIUM" --version >&2 || true
