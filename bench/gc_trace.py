"""Run a script with every cyclic-collector pass timed: which generation, how long.

    python bench/gc_trace.py LOG path/to/run_gateway.py [its arguments...]

The script runs as ``__main__`` with its own directory first on ``sys.path`` (as
``python path/to/script.py`` would), so any checkout's ``run_gateway.py`` can be traced,
an old one included. ``gc.callbacks`` records each collection's time (epoch), generation,
wall-clock pause and the objects it collected; at exit one line per pass and a summary per
generation are written to LOG. ``bench.gateway_fleet --gc-log`` starts its gateways so.
"""

from __future__ import annotations

import atexit
import gc
import runpy
import sys
import time
from pathlib import Path

passes: list[tuple[float, int, float, int]] = []  # (at, generation, pause s, collected)
_started: list[float] = []


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started.append(time.perf_counter())
    elif _started:
        pause = time.perf_counter() - _started.pop()
        passes.append((time.time(), info["generation"], pause, info["collected"]))


def read(log: Path) -> list[tuple[float, int, float, int]]:
    """The passes a traced run wrote to ``log``."""
    found = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1] == "gen":
            found.append((float(parts[0]), int(parts[2]), float(parts[3]) / 1000, int(parts[5])))
    return found


def summary(passes: list[tuple[float, int, float, int]]) -> list[str]:
    """One line per generation: passes, total, median and longest pause."""
    lines = []
    for generation in (0, 1, 2):
        pauses = sorted(p for _, g, p, _ in passes if g == generation)
        if not pauses:
            lines.append(f"gen {generation}: 0 passes")
            continue
        lines.append(
            f"gen {generation}: {len(pauses)} passes, total {1000 * sum(pauses):.1f} ms, "
            f"median {1000 * pauses[len(pauses) // 2]:.2f} ms, max {1000 * pauses[-1]:.1f} ms"
        )
    return lines


def main() -> None:
    log, script = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    sys.argv = [str(script), *sys.argv[3:]]
    sys.path[0] = str(script.parent)

    def dump() -> None:
        with log.open("w") as out:
            out.write(f"thresholds {gc.get_threshold()} frozen {gc.get_freeze_count()}\n")
            for at, generation, pause, collected in passes:
                out.write(f"{at:.3f} gen {generation} {1000 * pause:8.2f} ms {collected}\n")
            out.write("\n".join(summary(passes)) + "\n")

    atexit.register(dump)
    gc.callbacks.append(_on_gc)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
