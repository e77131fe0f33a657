#!/usr/bin/env bash
# Install a pinned Synapse (the Matrix homeserver) into its own venv, .tools/synapse-venv,
# for the Matrix transport's tests (tests/test_matrix.py) and the demo's --matrix mode.
#
# Synapse lives outside the project's .venv on purpose: its own pins (Twisted,
# pydantic, ...) must not decide the project's dependency versions. Idempotent:
# a stamp file names the installed version, and a second run does nothing.
# When the install fails (no Python venv module, no wheel for this platform),
# it says so and exits 0: the Matrix tests then skip with one clear reason.
set -euo pipefail
cd "$(dirname "$0")/.."

SYNAPSE_VERSION="${SLED_SYNAPSE_VERSION:-1.163.2}"
venv=".tools/synapse-venv"
stamp="$venv/.installed-matrix-synapse-$SYNAPSE_VERSION"
python="${PYTHON:-python3}"

if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi
echo "install-synapse.sh: installing matrix-synapse==$SYNAPSE_VERSION into $venv..." >&2
if ! { [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"; } >&2; then
    echo "install-synapse.sh: could not create $venv; the Matrix tests will be skipped" >&2
    exit 0
fi
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "matrix-synapse==$SYNAPSE_VERSION" >&2; then
    echo "install-synapse.sh: pip could not install matrix-synapse==$SYNAPSE_VERSION;" \
         "the Matrix tests will be skipped" >&2
    exit 0
fi
rm -f "$venv"/.installed-matrix-synapse-*
touch "$stamp"
"$venv/bin/python" -c 'import synapse; print("synapse", synapse.__version__)' >&2
