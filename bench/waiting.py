"""Hold N undecided permission requests in one uplink; print its RSS and threads.

python -m bench.waiting GATEWAY_URL N
"""

from __future__ import annotations

import json
import sys
import threading
import time

from actors import Uplink, UplinkConfig
from actors.logsetup import configure_logging


def rss_kib(field: str = "VmRSS:") -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    configure_logging("WARNING")
    config = UplinkConfig(upstream_url=url, project="bench-waiting", permission_timeout=600)
    with Uplink(config) as uplink:
        uplink.wait_connected(10)
        idle_rss = rss_kib()
        futures = [uplink.request_permission("Bash", {"i": i}) for i in range(count)]
        deadline = time.monotonic() + 60
        while uplink.status()["permissions"].get("pending", 0) < count:
            if time.monotonic() > deadline:
                raise SystemExit("requests did not all reach the registry")
            time.sleep(0.05)
        figures = {
            "idle_rss_kib": idle_rss,
            "rss_kib": rss_kib(),
            "peak_rss_kib": rss_kib("VmHWM:"),
            "threads": threading.active_count(),
            "pending": uplink.status()["permissions"]["pending"],
        }
    assert all(f.done() for f in futures)  # stop() denied them all
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
