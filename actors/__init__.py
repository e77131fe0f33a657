"""The uplink's actors (pykka) and the library API built on them.

``Uplink`` + ``UplinkConfig`` are the public entry points; the actor modules
(one actor each) are the extension points: subclass :class:`UplinkActor` (or
:class:`UplinkLoopActor` for an actor whose work is all I/O), handle
:class:`EnvelopeIn`, and register the class for a new envelope kind.
"""

from actors.base import UplinkActor, UplinkLoopActor, handles
from actors.config import UplinkConfig
from actors.context import Role, UplinkContext
from actors.messages import EnvelopeIn, SendFrame, SessionClosed, SessionOpened
from actors.system import DEFAULT_HANDLERS, Uplink

__all__ = [
    "DEFAULT_HANDLERS",
    "EnvelopeIn",
    "Role",
    "SendFrame",
    "SessionClosed",
    "SessionOpened",
    "Uplink",
    "UplinkActor",
    "UplinkConfig",
    "UplinkContext",
    "UplinkLoopActor",
    "handles",
]
