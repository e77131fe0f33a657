"""Everything the NATS bus needs from nats-py beyond its public API, in one place.

``Subscription.drain()`` is nats-py's public way to stop a subscription without
losing what the server already routed to it: send ``UNSUB``, then a ``PING``,
and stop once the ``PONG`` shows the server read the ``UNSUB``, handling every
message that came before it. In nats-py 2.16 (and on its main branch as of
2026-12) the ``UNSUB`` waits in the client's pending buffer for the flusher
task, while the ``PING`` is written to the socket at once. So the ``PING``
leaves first, its ``PONG`` proves nothing about the ``UNSUB``, and a request
the server routes in between is dropped exactly as after a plain
``unsubscribe()``: its requester waits out its whole timeout. Measured with
requests every 0.2 ms across each stop, 4 to 41 of 1,200 were dropped that way
(a plain ``unsubscribe()``: about 1 in 5).

:func:`drain_subscription` puts the ``UNSUB`` on the wire first, then lets
``drain()`` do the rest. The ``UNSUB`` that ``drain()`` sends again names a
subscription the server no longer has, which it ignores. It relies on:

- ``Subscription._conn`` and ``Subscription._id``: the client and the sid;
- ``Client._send_unsubscribe(sid)``: queues ``UNSUB <sid>``;
- ``Client._flush_pending(force_flush=True)``: returns once the flusher task
  wrote what is queued.

``tests/test_nats_adapter.py`` checks each against the installed nats-py,
whose minor release ``pyproject.toml`` pins, and that the drain loses nothing.
This is the one module of ``sled_gateway/`` allowed to use them
(``tests/test_architecture.py``).
"""

from __future__ import annotations

from nats.aio.subscription import Subscription


async def drain_subscription(sub: Subscription) -> None:
    """``sub.drain()``, with its ``UNSUB`` on the wire before the ``PING`` that
    confirms it; raises what ``drain()`` raises (a closed or draining connection)."""
    conn = sub._conn
    await conn._send_unsubscribe(sub._id)
    await conn._flush_pending(force_flush=True)
    await sub.drain()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated


__all__ = ["drain_subscription"]
