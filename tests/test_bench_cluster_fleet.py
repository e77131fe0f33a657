"""A smoke run of ``bench.cluster_fleet``: a tiny fleet across three real replicas.

PostgreSQL, nats-server and three ``run_gateway.py`` processes, as the bench
starts them; the figures are not asserted (speed is measured in ``bench/``),
only that every phase ran and the report says what it found.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import pg
from tests.support import nats as nats_support

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent


def test_a_tiny_fleet_runs_every_phase_of_the_cluster_bench() -> None:
    if pg.MISSING:
        pytest.skip(pg.MISSING)
    nats_support.require()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cluster_fleet",
            "--sleds",
            "30",
            "--samples",
            "20",
            "--settle",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    report = done.stdout
    assert done.returncode == 0, report + done.stderr[-3000:]
    assert "connect: all 30 connected and identified" in report
    assert sum(line.startswith("  replica ") for line in report.splitlines()) == 3
    assert "same  (POST to replica 1): p50" in report
    # Either measured, or said plainly to be missing (a gateway without cross-replica decisions).
    assert "cross (POST to replica 2): p50" in report or "cross (POST to replica 2): not" in report
    assert "kill -9 of replica 3, which held 10 sleds" in report
    assert "all 30 connected again: yes" in report
    assert "sleds of the surviving replicas disconnected: 0" in report
    assert "not throughput scaling" in report


def test_a_fleet_smaller_than_the_replicas_is_refused_with_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.cluster_fleet", "--sleds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "error: --sleds must be at least 3" in done.stderr.strip().splitlines()[-1]
