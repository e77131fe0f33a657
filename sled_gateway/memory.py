"""How the gateway's process hands freed memory back to the system.

A sled may send inputs of up to ``--max-input-bytes`` (1 MiB); each passes
through a few blocks of that size (the frame, the parsed input, its canonical
JSON) that are freed at once, while a pending one's input stays. glibc serves
a block this big from ``mmap`` and returns it when freed, until the first such
free: then it raises its mmap threshold (up to 32 MiB) and serves the next ones
from its heap, where the inputs that stay pin the holes the others leave. A
flood of 1,000 inputs of 1 MB, 67 of them kept, then left the process 500 MiB
bigger instead of 70 (tests/test_security_bounds.py). Setting the threshold
fixes it where it is: big blocks stay in ``mmap`` and go back when freed.

Process-wide, so ``run_gateway.py`` calls it; a program embedding the gateway
decides for its own process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
