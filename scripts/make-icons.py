"""Draw the console's app icons (192 and 512 px PNG) with the standard library alone.

A dark rounded square with a green check mark: what the console is for. The
PNGs are committed (``sled_gateway/static/icons/``); run this again only to
change the drawing: ``python scripts/make-icons.py``.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sled_gateway" / "static" / "icons"
BACKGROUND = (0x1D, 0x23, 0x30)
MARK = (0x34, 0xD3, 0x99)
SIZES = (192, 512)


def _segment_distance(
    px: float, py: float, a: tuple[float, float], b: tuple[float, float]
) -> float:
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _pixel(x: float, y: float) -> tuple[int, int, int, int]:
    """The colour at (x, y) in a unit square; transparent outside the rounded corners."""
    r = 0.18
    cx, cy = min(max(x, r), 1 - r), min(max(y, r), 1 - r)
    if math.hypot(x - cx, y - cy) > r:
        return (0, 0, 0, 0)
    stroke = 0.07
    near = min(
        _segment_distance(x, y, (0.27, 0.52), (0.43, 0.68)),
        _segment_distance(x, y, (0.43, 0.68), (0.74, 0.34)),
    )
    return (*MARK, 255) if near <= stroke else (*BACKGROUND, 255)


def png(size: int) -> bytes:
    rows = bytearray()
    for j in range(size):
        rows.append(0)  # filter: none
        for i in range(size):
            rows.extend(_pixel((i + 0.5) / size, (j + 0.5) / size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for size in SIZES:
        (OUT / f"icon-{size}.png").write_bytes(png(size))


if __name__ == "__main__":
    main()
