"""Which replica speaks to people: one PostgreSQL session-level advisory lock.

With several replicas every one may run the Matrix transport, yet each request must
be posted to the room once. The transport whose replica holds this lock posts the
whole fleet's requests (it follows the fleet-wide read model) and reads the room's
replies; the others stand by and try to take the lock on each check. Any replica may
decide, since a decision is the store's compare-and-set, so the choice of speaker
only decides who posts, never who may answer.

The lock lives on one dedicated connection: when the speaker's process dies the
database ends that session and frees the lock, and the next standby to check takes
over and posts every request still pending again (marked as a repost). Keepalives on
that session bound how long a vanished host keeps it. A single-node store (SQLite)
has one replica, which always speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from loguru import logger
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sled_gateway.store import postgresql

log = logger.bind(actor="replicas")

#: Names the lock among the database's advisory locks.
SPEAKER_LOCK = "sled-uplink people transport speaker"

# The server's side of the lock's session: notice a vanished speaker within ~20 s.
_KEEPALIVE_SETTINGS = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
)


class SpeakerLock:
    """Take and keep the speaker lock on ``url``'s database (a PostgreSQL URL)."""

    def __init__(self, url: Any) -> None:
        self._engine = create_engine(
            url,
            poolclass=NullPool,
            hide_parameters=True,
            connect_args=postgresql.connect_args(url),
        )
        self._conn: Any = None

    async def hold(self) -> bool:
        """True while this process holds the lock (taking it if free)."""
        return await asyncio.to_thread(self._hold)

    def _hold(self) -> bool:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
            except Exception as exc:  # the session is gone, and the lock with it
                log.warning("the people speaker lock's session was lost: {}", exc)
                self._drop()
            else:
                return True
        try:
            conn = self._engine.connect()
        except Exception as exc:
            log.debug("speaker lock: database unreachable: {}", exc)
            return False
        try:
            for setting in _KEEPALIVE_SETTINGS:
                conn.execute(text(setting))
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"),
                {"key": SPEAKER_LOCK},
            ).scalar()
            conn.commit()  # the lock is the session's, not the transaction's
        except Exception as exc:
            log.debug("speaker lock not tried: {}", exc)
            got = False
        if got:
            self._conn = conn
            return True
        with contextlib.suppress(Exception):
            conn.close()
        return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Let the lock go (closing its session), so a standby takes over at once."""
        self._drop()
        self._engine.dispose()
