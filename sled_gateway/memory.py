"""How the gateway's process hands freed memory back, and keeps its collector short.

A sled may send inputs of up to ``--max-input-bytes`` (1 MiB); each passes
through a few blocks of that size (the frame, the parsed input, its canonical
JSON) that are freed at once, while a pending one's input stays. glibc serves
a block this big from ``mmap`` and returns it when freed, until the first such
free: then it raises its mmap threshold (up to 32 MiB) and serves the next ones
from its heap, where the inputs that stay pin the holes the others leave. A
flood of 1,000 inputs of 1 MB, 67 of them kept, then left the process 500 MiB
bigger instead of 70 (tests/test_security_bounds.py). Setting the threshold
fixes it where it is: big blocks stay in ``mmap`` and go back when freed.

The cyclic garbage collector's full pass walks every tracked object, and a
connected sled keeps about 120 of them (coroutines, frames, buffers): at 5,000
sleds one pass took 160-370 ms on a quiet 2-CPU VM (``bench.gateway_fleet
--gc-log``), and every request in flight waited for it. :func:`tune_collector`
freezes what start-up built (modules, routes, the store, the config: alive
until exit) so no pass walks it again, and sets the thresholds.
:class:`FleetFreezer` then freezes the sleds' objects as the fleet grows, runs
the young passes by time rather than by count, and gives everything back to the
collector when enough sleds have left or ten minutes have passed (see there why
that does not leak).

Process-wide, so ``run_gateway.py`` calls these; a program embedding the
gateway decides for its own process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time
from collections.abc import Callable

from loguru import logger

#: glibc's mallopt() parameter for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Blocks from this size up are mmapped and returned on free (glibc's own default start).
MMAP_THRESHOLD = 128 * 1024


def return_big_blocks() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt to call
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        logger.debug("mallopt(M_MMAP_THRESHOLD) refused; freed inputs may stay in the heap")
    return done


#: The collector's thresholds after start-up: (generation 0, 1, 2), CPython's
#: defaults, measured against a larger young generation. At 10,000 a young pass
#: ran a tenth as often, but each one walked enough to take 76-82 ms of CPU at
#: 5,000 sleds, and the p99 tripled (96 ms against 31, A/B in docs/benchmarks.md).
#: With the fleet frozen, the older generations hold only what changed since the
#: last freeze, so their default ratios cost little. Set here so a caller that
#: changed them gets the measured ones.
THRESHOLDS = (700, 10, 10)


def tune_collector(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Freeze every object alive now (call after start-up) and set the thresholds.

    A frozen object is never walked by a collection again; it is still freed by
    reference counting when its last reference goes. What start-up built lives
    until exit anyway, so freezing it loses nothing. A full pass first, so that
    start-up's own garbage is not frozen with it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


class FleetFreezer:
    """Freeze the connected sleds' objects as the fleet grows; thaw when sleds leave.

    A frozen object is skipped by every collection, so a full pass costs what
    was allocated since the last freeze, not the whole fleet.

    With a fleet (``min_sleds`` or more), each :meth:`tick` (every 0.5 s in
    ``run_gateway.py``) also runs a young pass and freezes its survivors. A
    sled's heartbeat or ping replaces its waiting state (a new future, handle,
    frame...: about 15 objects) and frees the old one, so CPython's count,
    allocations minus deallocations, does not move while the young list fills
    with a whole round of the fleet's waiting states: the pass that finally ran
    walked 75,000 objects at 5,000 sleds, 46 ms, and the generation-1 pass after
    it as long again. By time, each pass walks half a second of them (a few ms).

    Freezing cannot lose an object that reference counting frees (most of a
    session's objects when it ends, a replaced waiting state at once); what it
    can keep is *cyclic* garbage among frozen objects, which only a collection
    would find. So that this stays bounded:

    - each freeze follows a young pass, so what is garbage already is not frozen;
      only cycles alive at that moment can be;
    - once sleds that were frozen have left (``churn`` of the count at the last
      thaw, at least ``min_sleds``), or ``thaw_every`` seconds after the last
      thaw, everything is unfrozen, one full collection frees what was left, and
      the survivors are frozen again.

    Cyclic garbage then waits at most ``thaw_every`` seconds, or a ``churn``
    turnover of the fleet; the price is one full pass each time (CPython's own
    rule runs one each time the long-lived heap grows by a quarter). Counting is
    fed by the hub's ``SledUp``/``SledDown`` events on the gateway's loop;
    :meth:`tick` runs on any thread (the collector holds the GIL).
    """

    def __init__(
        self,
        grow: float = 1.25,
        churn: float = 0.25,
        min_sleds: int = 64,
        thaw_every: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grow, self.churn, self.min_sleds = grow, churn, min_sleds
        self.thaw_every, self.clock = thaw_every, clock
        self.thawed_mono = clock()
        self.live = 0  # identified sessions now
        self.left = 0  # identified sessions ended since the last thaw
        self.frozen_at = 0  # ``live`` at the last freeze
        self.freezes = 0
        self.thaws = 0

    def sled_up(self, _event: object) -> None:
        self.live += 1

    def sled_down(self, event: object) -> None:
        if getattr(event, "project", None) is not None:  # only identified ones were counted up
            self.live -= 1
            self.left += 1

    def tick(self) -> str | None:
        """Freeze or thaw if due; returns what was done ("freeze", "thaw", "young") or None."""
        overdue = self.clock() - self.thawed_mono >= self.thaw_every
        if self.left >= max(self.min_sleds, self.churn * self.frozen_at) or (
            overdue and self.live >= self.min_sleds
        ):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.frozen_at, self.left = self.live, 0
            self.thawed_mono = self.clock()
            self.thaws += 1
            return "thaw"
        if self.live >= max(self.min_sleds, self.grow * self.frozen_at):
            gc.collect(1)
            gc.freeze()
            # ``left`` is kept: the sleds that left were frozen before, their cycles wait a thaw.
            self.frozen_at = self.live
            self.freezes += 1
            return "freeze"
        if self.live >= self.min_sleds:
            gc.collect(1)
            gc.freeze()
            return "young"
        return None
