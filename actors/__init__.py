"""The uplink's actors (pykka) and the library API built on them.

``Uplink`` + ``UplinkConfig`` are the public entry points; the actor modules
(one actor each) are the extension points: subclass :class:`UplinkActor` (or
:class:`UplinkLoopActor` for an actor whose work is all I/O), handle
:class:`EnvelopeIn` (answer through its ``sink``), and register the class for
a new envelope kind.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.base import UplinkActor, UplinkLoopActor, handles
    from actors.config import UplinkConfig
    from actors.context import Role, UplinkContext
    from actors.messages import EnvelopeIn, SessionClosed, SessionOpened
    from actors.sink import FrameSink
    from actors.system import DEFAULT_HANDLERS, Uplink

# Loaded on first use, so that importing one actor module (``actors.permissions``,
# say) does not load the whole uplink and the WebSocket stack with it.
_EXPORTS = {
    "DEFAULT_HANDLERS": "actors.system",
    "EnvelopeIn": "actors.messages",
    "FrameSink": "actors.sink",
    "Role": "actors.context",
    "SessionClosed": "actors.messages",
    "SessionOpened": "actors.messages",
    "Uplink": "actors.system",
    "UplinkActor": "actors.base",
    "UplinkConfig": "actors.config",
    "UplinkContext": "actors.context",
    "UplinkLoopActor": "actors.base",
    "handles": "actors.base",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_HANDLERS",
    "EnvelopeIn",
    "FrameSink",
    "Role",
    "SessionClosed",
    "SessionOpened",
    "Uplink",
    "UplinkActor",
    "UplinkConfig",
    "UplinkContext",
    "UplinkLoopActor",
    "handles",
]
