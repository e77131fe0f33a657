"""Reconnect back-off (jittered, exponential), as pure logic with an injectable RNG.

The first wait is the initial delay; each failed connect or short session
multiplies the next wait, up to the cap; every wait is then jittered by up to
±20 % (after the cap) so a fleet does not reconnect in step; a session that
stayed up for ``reset_after`` returns the next wait to the initial delay; a
401/403 waits the (jittered) maximum.

A gateway that closes with ``retry_after=<s>`` (a replica draining, or one
that cannot take sleds now) gets *full jitter* instead: a uniformly random
wait in ``[0, s]``, so the fleet it closed spreads over the whole window
rather than returning together; the exponential state is left as it was.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    JITTER = 0.2

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        multiplier: float,
        reset_after: float,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.reset_after = reset_after
        self._rng = rng
        self.base = initial  # the un-jittered next wait

    def next_delay(self, up_for: float | None, *, auth_failed: bool = False) -> float:
        """The wait before the next connect, given how the last session went.

        ``up_for`` is how long the session was up (None: it never came up).
        """
        if up_for is not None and up_for >= self.reset_after:
            self.base = self.initial
        wait = self.maximum if auth_failed else self.base
        self.base = min(self.base * self.multiplier, self.maximum)
        return self.jitter(wait)

    def full_jitter(self, retry_after: float) -> float:
        """A uniformly random wait in ``[0, retry_after]``."""
        return retry_after * self._rng()

    def jitter(self, wait: float) -> float:
        return wait * (1 + self.JITTER * (2 * self._rng() - 1))
