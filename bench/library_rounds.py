"""The library API's ratios only, over many rounds, in this checkout.

    .venv/bin/python -m bench.library_rounds [rounds]

``bench.run`` takes three pipelined samples per run, and on a shared VM one
sample of decisions/s at 64 in flight swings by half. This measures only the
library figures, each round beside its own raw baseline (the raw pipeline
before and after the uplink's), and prints the median ratio over the rounds.
To compare two versions, run it in each checkout in turn, several times.

Its own loops (the raw client's and the asyncio face's, side by side) are
asyncio's, not ``bench.peers.run_loop``'s: ``bench.library_ab`` runs this in
older checkouts, whose uplink cannot be lent a uvloop loop.
"""

from __future__ import annotations

import asyncio
import statistics
import sys

from bench.run import (
    async_library,
    library_pipeline,
    library_sequential,
    peer,
    pin,
    raw_ws_pipeline,
    raw_ws_sequential,
    ws_url,
)

PIPELINED = 2000
SEQUENTIAL = 200


def main(argv: list[str]) -> int:
    from actors import Uplink, UplinkConfig
    from actors.logsetup import configure_logging

    rounds = int(argv[0]) if argv else 8
    configure_logging("WARNING")
    pin()
    ratios: dict[str, list[float]] = {
        "decisions/s, 64 in flight, asyncio": [],
        "decisions/s, 64 in flight, blocking": [],
        "permission p50, asyncio": [],
        "permission p50, blocking": [],
    }
    async_pipe, blocking_pipe, async_p50, blocking_p50 = ratios.values()
    with peer("gateway", "--auto", "approve") as gateway_port:
        url = ws_url(gateway_port)
        with Uplink(UplinkConfig(upstream_url=url, project="bench")) as uplink:
            uplink.wait_connected(10)
            library_sequential(uplink, SEQUENTIAL)  # warm-up
            for _ in range(rounds):
                before = asyncio.run(raw_ws_pipeline(url, PIPELINED, 64))
                asyncio_rate = asyncio.run(async_library(url, 0, PIPELINED, 64))[1]
                blocking_rate = library_pipeline(uplink, PIPELINED, 64)
                raw_rate = (before + asyncio.run(raw_ws_pipeline(url, PIPELINED, 64))) / 2
                async_pipe.append(asyncio_rate / raw_rate)
                blocking_pipe.append(blocking_rate / raw_rate)
                raw_p50 = statistics.median(asyncio.run(raw_ws_sequential(url, SEQUENTIAL)))
                samples = asyncio.run(async_library(url, SEQUENTIAL, 0, 0))[0]
                async_p50.append(statistics.median(samples) / raw_p50)
                blocking_p50.append(
                    statistics.median(library_sequential(uplink, SEQUENTIAL)) / raw_p50
                )
    for name, values in ratios.items():
        print(
            f"{name:38s} median {statistics.median(values):.2f}×  "
            f"range {min(values):.2f}–{max(values):.2f}×  over {rounds} rounds"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
