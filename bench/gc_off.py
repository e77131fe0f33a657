"""Run a gateway script with the cyclic collector as CPython leaves it: the "off" side of
``bench.gateway_fleet --gc-ab``.

    python bench/gc_off.py path/to/run_gateway.py [its arguments...]

``sled_gateway.memory``'s start-up freeze and thresholds (:func:`tune_collector`) and the
fleet's freezing and timed young passes (:class:`FleetFreezer`'s tick) are made no-ops in
the checkout the script belongs to; everything else runs as it is. So one run can show
what they do, beside the same code with them on.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: gc_off.py SCRIPT [ARGS...]")
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path[0] = str(script.parent)  # the script's checkout, as `python SCRIPT` would
    from sled_gateway import memory

    memory.tune_collector = lambda *_args, **_kwargs: None  # type: ignore[assignment]
    memory.FleetFreezer.tick = lambda _self: None  # type: ignore[method-assign,assignment]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
