"""Ingress round trip, this checkout against another one, side by side.

    git worktree add --detach /tmp/old v0.1.0-commit
    .venv/bin/python -m bench.ingress_ab /tmp/old [rounds]

Both ``run_uplink.py`` processes connect to the same gateway peer; each is
warmed up (and has loaded its Claude Code endpoint) before sampling, and the
rounds alternate which one goes first, so drift on the machine hits both
alike. Prints p50 and p90 of sequential ``POST /permission`` for each, and
the CPU time each uplink process spent per request (user + system, all
threads): less noisy than latency on a shared machine, and it says which
side does more work.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.run import PY, REPO, free_port, peer, proc_cpu_seconds, wait_ready

PER_ROUND = 200
BODY = {"tool_name": "Bash", "tool_input": {"command": "ls"}}


def main(argv: list[str]) -> int:
    other, rounds = Path(argv[0]).resolve(), int(argv[1]) if len(argv) > 1 else 10
    with peer("gateway", "--auto", "approve") as gateway_port:
        url = f"ws://127.0.0.1:{gateway_port}/api/sled-uplink"
        sides: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for name, checkout in (("other", other), ("this", REPO)):
                port = free_port()
                command = [PY, "run_uplink.py", "--upstream-gateway", url, "--log-level", "WARNING"]
                command += ["--project", f"ab-{name}", "--listen", f"127.0.0.1:{port}"]
                sides[name] = (subprocess.Popen(command, cwd=checkout), port)
            samples: dict[str, list[float]] = {name: [] for name in sides}
            cpu = dict.fromkeys(sides, 0.0)
            with httpx.Client(timeout=10) as client:
                for _, port in sides.values():
                    wait_ready(port)
                    for _ in range(300):  # warm-up
                        client.post(f"http://127.0.0.1:{port}/permission", json=BODY)
                for r in range(rounds):
                    order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
                    for name, (proc, port) in order:
                        cpu_before = proc_cpu_seconds(proc.pid)
                        for _ in range(PER_ROUND):
                            started = time.perf_counter()
                            answer = client.post(f"http://127.0.0.1:{port}/permission", json=BODY)
                            samples[name].append(time.perf_counter() - started)
                            assert answer.status_code == 200, answer.text
                        cpu[name] += proc_cpu_seconds(proc.pid) - cpu_before
        finally:
            for proc, _ in sides.values():
                proc.terminate()
                proc.wait(10)
    for name, values in samples.items():
        values.sort()
        p50, p90 = statistics.median(values), values[int(len(values) * 0.9)]
        per_request = cpu[name] / len(values)
        print(
            f"{name:>5}: n {len(values)}  p50 {p50 * 1e6:.0f} µs  p90 {p90 * 1e6:.0f} µs"
            f"  CPU {per_request * 1e6:.0f} µs/request"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
