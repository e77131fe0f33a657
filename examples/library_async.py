"""Embed the uplink in an asyncio sled: the README's asyncio example, runnable.

    .venv/bin/python examples/library_async.py

``async with Uplink(...)`` lends the uplink the running loop: its socket, its
permission registry and your awaits share one thread, so ``adecide`` reaches
the gateway without a thread hand-off. The reference gateway runs in-process
(auto-approving), as in ``examples/library.py``.
"""

from __future__ import annotations

import asyncio

from actors import Uplink, UplinkConfig
from actors.logsetup import configure_logging
from sled_gateway import Gateway


async def ask(url: str) -> None:
    config = UplinkConfig(upstream_url=url, project="my-async-sled")
    async with Uplink(config) as uplink:  # astart … astop (astop denies what is left)
        await uplink.await_connected(timeout=5)
        outcome = await uplink.adecide("Bash", {"command": "rm -rf build"}, timeout=10)
        print("decision:", outcome.decision, "reason:", outcome.reason)
        many = await asyncio.gather(
            *(uplink.adecide("Read", {"file_path": name}) for name in ("a.md", "b.md", "c.md"))
        )
        print("gathered:", ", ".join(str(o.decision) for o in many))
        print("pending:", uplink.status()["permissions"]["pending"])


def main() -> None:
    configure_logging("WARNING")
    with Gateway(token="s3cret", auto="approve") as gateway:
        asyncio.run(ask(gateway.url_for_sleds()))


if __name__ == "__main__":
    main()
