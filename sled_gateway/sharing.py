"""Keeping this replica in step with the others on one database: rules and console
sessions changed elsewhere.

The database is the truth; the bus only rings the doorbell. When a rule is
made or revoked here, the replica says so on :data:`RULES_SUBJECT`, and every
replica that hears it reads the active rules again. Because a bus message can
be lost (NATS down, reconnecting), each replica also compares the rules'
signature every :data:`RULES_SWEEP_S` seconds (one cheap query) and whenever
the bus reconnects, so a revoked allow rule stops allowing on every replica
within that bound whatever NATS does. Console sessions ended elsewhere arrive
on :data:`~sled_gateway.auth.console.SESSIONS_SUBJECT`; without the message,
their cache bound applies (:mod:`sled_gateway.auth.console`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable

from loguru import logger

from sled_gateway.auth.console import SESSIONS_SUBJECT, Sessions
from sled_gateway.bus import Bus, Message
from sled_gateway.events import Events, RulesChanged
from sled_gateway.store import Store, StoreError

log = logger.bind(actor="gateway-sharing")

#: The bus subject on which a replica says its rules changed: ``{"from": <replica nonce>}``.
RULES_SUBJECT = "gateway.rules"
#: How often the rules' signature is compared with the database's (the bound on a
#: rule change reaching this replica when no bus message does).
RULES_SWEEP_S = 2.0


class Sharing:
    """Follows rule and session changes made by other replicas (on the gateway's loop)."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        events: Events,
        sessions: Sessions,
        *,
        sweep_seconds: float = RULES_SWEEP_S,
    ) -> None:
        self.store = store
        self.bus = bus
        self.sessions = sessions
        self.sweep_seconds = sweep_seconds
        # This replica's own messages come back on NATS; they need no re-read.
        self._me = secrets.token_hex(8)
        self._wake = asyncio.Event()
        #: Re-reads that found the rules changed (by another replica, or by this one).
        self.reloads = 0
        self._failing = False  # the store could not be read last time (said once per outage)
        events.subscribe(RulesChanged, self._changed_here)

    def _changed_here(self, _event: RulesChanged) -> None:
        self.bus.publish(RULES_SUBJECT, {"from": self._me})

    def _heard(self, message: Message) -> None:
        if message.get("from") != self._me:
            self._wake.set()

    async def run(self) -> None:
        """Subscribe, then re-read the rules when told and on every sweep, until cancelled."""
        unsubscribe: list[Callable[[], None]] = [
            self.bus.subscribe(RULES_SUBJECT, self._heard),
            self.bus.subscribe(SESSIONS_SUBJECT, self.sessions.on_bus_message),
            self.bus.on_reconnect(self._reconnected),
        ]
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.sweep_seconds)
                self._wake.clear()
                await self.reload()
        finally:
            for stop in unsubscribe:
                stop()

    def _reconnected(self) -> None:
        # Messages may have been lost while NATS was away: sessions read afresh, rules now.
        self.sessions.forget_all()
        self._wake.set()

    async def reload(self) -> None:
        try:
            if await self.store.reload_rules():
                self.reloads += 1
                log.info(
                    "rules re-read (changed since last read): {} active", len(self.store.policy)
                )
        except StoreError as exc:
            log.warning("rules not re-read (the store: {}); trying again", exc)
        except Exception:
            log.exception("rules not re-read")
