"""``GET /readyz``: whether this replica should get sleds now.

A load balancer polls it (no credential, like ``/healthz``) and sends sleds
only to a replica that answers ``200``. It answers ``503`` with a reason:

- ``draining``: the replica got SIGTERM and is closing its sleds
  (:meth:`sled_gateway.hub.Hub.drain`);
- ``database``: the store cannot commit (:meth:`sled_gateway.store.Store.check`),
  so any decision would fail; the replica must not take sleds whose requests
  it cannot record.

The store is probed at most once a second whoever polls, one probe at a time,
each bounded by :data:`PROBE_TIMEOUT`: an unauthenticated flood of ``/readyz``
costs the writer nothing more, and a lost database shows within about
``PROBE_TIMEOUT + CACHE_FOR`` seconds (the contract says within 5).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger

from sled_gateway.store import Store, StoreError

log = logger.bind(actor="gateway")

#: How long one probe of the store may take before the store counts as lost.
PROBE_TIMEOUT = 2.0
#: How long a probe's verdict is reused.
CACHE_FOR = 1.0


class Readiness:
    """The ``/readyz`` verdict: ``None`` when ready, else ``(reason, detail)``."""

    def __init__(self, store: Store, draining: Callable[[], bool]) -> None:
        self.store = store
        self.draining = draining
        self._probe: asyncio.Task[str | None] | None = None
        self._verdict: str | None = None
        self._at = -CACHE_FOR
        self._logged: str | None = None

    async def _run_probe(self) -> str | None:
        try:
            await self.store.check(PROBE_TIMEOUT)
        except StoreError as exc:
            return str(exc)
        except Exception as exc:  # a driver's own error: still "cannot commit"
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _database(self) -> str | None:
        if time.monotonic() - self._at < CACHE_FOR:
            return self._verdict
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._run_probe())
        try:
            verdict = await asyncio.wait_for(asyncio.shield(self._probe), PROBE_TIMEOUT + 0.5)
        except TimeoutError:
            verdict = f"no answer from the store within {PROBE_TIMEOUT:g} s"
        self._verdict, self._at = verdict, time.monotonic()
        if verdict != self._logged:
            if verdict is None:
                log.info("readyz: the store commits again")
            else:
                log.error("readyz: the store cannot commit: {}", verdict)
            self._logged = verdict
        return verdict

    async def verdict(self) -> tuple[str, str] | None:
        """None when this replica should get sleds; else ``(reason, detail)``."""
        if self.draining():
            return ("draining", "the gateway is draining (SIGTERM): sleds go elsewhere")
        problem = await self._database()
        if problem is not None:
            return ("database", problem)
        return None
