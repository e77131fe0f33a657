"""Embed the uplink in a Python sled: the README's library example, runnable.

    .venv/bin/python examples/library.py

It starts the reference gateway in-process (auto-approving, so no human is
needed), then an uplink connected to it, asks for one permission, prints the
decision and the actor snapshot, and stops (denying anything left).
"""

from __future__ import annotations

from actors import Uplink, UplinkConfig
from actors.logsetup import configure_logging
from sled_gateway import Gateway


def main() -> None:
    configure_logging("WARNING")
    with Gateway(token="s3cret", auto="approve") as gateway:
        config = UplinkConfig(
            upstream_url=gateway.url_for_sleds(),  # ws://127.0.0.1:PORT/api/sled-uplink?token=…
            project="my-sled",
        )
        with Uplink(config) as uplink:  # start … stop (stop denies what is left)
            uplink.wait_connected(timeout=5)
            outcome = uplink.decide("Bash", {"command": "rm -rf build"}, timeout=10)
            print("decision:", outcome.decision, "reason:", outcome.reason)
            future = uplink.request_permission("Write", {"file_path": "notes.md"})
            print("second decision:", future.result(timeout=10).decision)
            status = uplink.status()
            print(
                "connection:", status["connection"]["state"], "| url:", status["connection"]["url"]
            )
            print(
                "pending:",
                status["permissions"]["pending"],
                "| decisions:",
                status["counters"]["decisions"],
            )


if __name__ == "__main__":
    main()
