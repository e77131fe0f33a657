"""Run a script with every cyclic-collector pass timed: which generation, how long.

    python bench/gc_trace.py LOG path/to/run_gateway.py [its arguments...]

The script runs as ``__main__`` with its own directory first on ``sys.path`` (as
``python path/to/script.py`` would), so any checkout's ``run_gateway.py`` can be traced,
an old one included. ``gc.callbacks`` records each collection's time (epoch), generation,
wall-clock pause, the objects it collected and its CPU time; at exit one line per pass and
a summary per generation are written to LOG. ``bench.gateway_fleet --gc-log`` starts its
gateways so.
"""

from __future__ import annotations

import atexit
import gc
import runpy
import sys
import time
from pathlib import Path

# (at, generation, pause s, collected, CPU s): the pause is wall-clock time, what a request
# waits; the CPU time is the collecting thread's own, which a busy machine does not inflate.
Pass = tuple[float, int, float, int, float]
passes: list[Pass] = []
_started: list[tuple[float, float]] = []


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started.append((time.perf_counter(), time.thread_time()))
    elif _started:
        wall, cpu = _started.pop()
        pause, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        passes.append((time.time(), info["generation"], pause, info["collected"], cpu))


def read(log: Path) -> list[Pass]:
    """The passes a traced run wrote to ``log``."""
    found = []
    for line in log.read_text().splitlines():
        p = line.split()
        if len(p) == 8 and p[1] == "gen":
            found.append(
                (float(p[0]), int(p[2]), float(p[3]) / 1000, int(p[5]), float(p[6]) / 1000)
            )
    return found


def summary(passes: list[Pass]) -> list[str]:
    """One line per generation: passes, total, median and longest pause, and CPU time."""
    lines = []
    for generation in (0, 1, 2):
        pauses = sorted(p[2] for p in passes if p[1] == generation)
        cpu = sorted(p[4] for p in passes if p[1] == generation)
        if not pauses:
            lines.append(f"gen {generation}: 0 passes")
            continue
        lines.append(
            f"gen {generation}: {len(pauses)} passes, total {1000 * sum(pauses):.1f} ms, "
            f"median {1000 * pauses[len(pauses) // 2]:.2f} ms, max {1000 * pauses[-1]:.1f} ms; "
            f"CPU total {1000 * sum(cpu):.1f} ms, max {1000 * cpu[-1]:.1f} ms"
        )
    return lines


def main() -> None:
    log, script = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    sys.argv = [str(script), *sys.argv[3:]]
    sys.path[0] = str(script.parent)

    def dump() -> None:
        with log.open("w") as out:
            out.write(f"thresholds {gc.get_threshold()} frozen {gc.get_freeze_count()}\n")
            for at, generation, pause, collected, cpu in passes:
                out.write(
                    f"{at:.3f} gen {generation} {1000 * pause:.2f} ms {collected} "
                    f"{1000 * cpu:.2f} ms\n"
                )
            out.write("\n".join(summary(passes)) + "\n")

    atexit.register(dump)
    gc.callbacks.append(_on_gc)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
