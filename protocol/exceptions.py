"""The one error tree of sled-uplink.

::

    UplinkError
    ├── ProtocolError               something on the wire is illegal
    │   ├── LocalProtocolError      *we* tried to build an illegal frame (a bug here)
    │   └── RemoteProtocolError     *the peer* sent an illegal frame (log, count, drop)
    └── ConfigError                 a configuration value is unusable (exit status 2)

``RemoteProtocolError.reason`` is a short, stable label (``binary``,
``not_json``, ``not_object``, ``bad_type``, ``bad_req_id``) used as the
``reason`` of the dropped-frames counter.
"""

from __future__ import annotations


class UplinkError(Exception):
    """Base class of every error this project raises on purpose."""


class ProtocolError(UplinkError):
    """A frame violates the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to serialize something that is not a legal frame."""


class RemoteProtocolError(ProtocolError):
    """The gateway sent something that is not a legal frame."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(UplinkError):
    """A configuration value is unusable; ``option`` names the culprit."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem
