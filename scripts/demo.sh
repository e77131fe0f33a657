#!/usr/bin/env bash
# The demo, in one command: set up .venv (first run only), then start on
# loopback the reference gateway (:8080, with a fresh random token), a local
# MCP server (the MCP SDK's, :3001) and the uplink (ingress :3002) connected
# to it; print what to do next; Ctrl-C stops all three cleanly (exit 0).
#
# Ports: SLED_DEMO_GATEWAY_PORT, SLED_DEMO_MCP_PORT, SLED_DEMO_UPLINK_PORT.
# The orchestration (start order, readiness, signals, stop order) lives in
# demo/run.py; `exec` hands it this process, so Ctrl-C and SIGTERM reach it
# directly.
set -euo pipefail
# Where the user stands, so the printed commands are right from there.
export SLED_DEMO_CALLER_CWD="${SLED_DEMO_CALLER_CWD:-$PWD}"
cd "$(dirname "$0")/.."
extras=gateway,demo
case " $* " in
    # The Matrix mode: the bot's client library, and Synapse in its own venv.
    *" --matrix "*) extras=gateway,demo,matrix; bash scripts/install-synapse.sh >&2 ;;
esac
bash scripts/bootstrap.sh "$extras" >&2
exec .venv/bin/python -m demo.run "$@"
