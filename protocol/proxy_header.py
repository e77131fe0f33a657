"""The PROXY protocol's version 2 header (HAProxy's ``send-proxy-v2``), parsed strictly.

A proxy that speaks it writes one binary header on each connection it opens to a
backend, before any byte it relays, naming the client's address and port. The
gateway's connection guard (``actors/http_guard.py``) reads it only from a peer
in ``--trusted-proxy``: from anyone else those bytes are not a header but the
start of a malformed HTTP request, refused as such.

The format (HAProxy's ``doc/proxy-protocol.txt``, section 2.2)::

    12 bytes  signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1 byte   version (high nibble, 2) and command (low: 0 LOCAL, 1 PROXY)
     1 byte   address family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and
              transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
     2 bytes  length of what follows (big-endian)
     ...      the addresses (INET: 4+4+2+2 bytes, INET6: 16+16+2+2, UNIX: 108+108),
              then TLVs (type, 2-byte length, value) to the end

What this accepts, and why:

- ``LOCAL`` (the proxy's own connection, such as its health checks), and ``PROXY``
  with the ``UNSPEC`` or ``UNIX`` family: no client address is named, so the
  connection's own peer (the proxy) stands, as the specification says.
- ``PROXY`` over ``INET``/``INET6`` with the ``STREAM`` transport: the source is the
  client. A datagram transport cannot be what reached an HTTP server.
- TLVs are walked so that one running past the header is refused. One is read:
  ``PP2_TYPE_SSL`` (``0x20``, HAProxy's ``send-proxy-v2-ssl``), whose
  ``PP2_CLIENT_SSL`` bit says the client reached the proxy over TLS: how a
  replica behind a TLS-terminating proxy knows its people use ``https``, without
  believing a request header. The others are skipped, as the specification
  says. (A ``CRC32C`` TLV is not checked: HAProxy sends one only when asked with
  ``proxy-v2-options crc32c``, and over TCP it adds nothing.)

Anything else (another signature, such as a version 1 ``PROXY TCP4 ...`` line; a
version other than 2; an unknown command, family or transport; an address block
shorter than its family needs; a header longer than :data:`MAX_HEADER_BYTES`)
raises :class:`~protocol.exceptions.RemoteProtocolError` with reason
``proxy_header``. :func:`parse_proxy_v2` is pure: bytes in, a value (or ``None``
while the header is incomplete) out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from protocol.exceptions import RemoteProtocolError

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part: signature, version and command, family and transport, length.
FIXED_BYTES = 16
#: The most a header may take, TLVs included. HAProxy's own headers are a few dozen
#: bytes; the bound caps what a connection buffers before anything is decided.
MAX_HEADER_BYTES = 4096
REASON = "proxy_header"

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
#: The address block of each family: (address bytes, whole block).
_BLOCK = {_INET: (4, 12), _INET6: (16, 36), _UNIX: (108, 216)}
#: The SSL TLV: one byte of flags, four of verify result, then sub-TLVs.
_TYPE_SSL, _SSL_FIXED, _CLIENT_SSL = 0x20, 5, 0x01


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header: how many bytes it took, and whom it names.

    ``source`` and ``destination`` are ``(address, port)``, or ``None`` when the
    header names no client (``LOCAL``, ``UNSPEC``, ``UNIX``): the connection's
    own peer stands. ``tls``: the client reached the proxy over TLS.
    """

    length: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tls: bool = False


def _refuse(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(REASON, detail)


def parse_proxy_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``; ``None`` while more bytes are needed.

    Refuses as soon as the bytes seen cannot begin a valid header (a plain HTTP
    request is refused on its first byte), so nothing waits for bytes that can
    never make one.
    """
    view = memoryview(data)
    seen = min(len(view), len(SIGNATURE))
    if bytes(view[:seen]) != SIGNATURE[:seen]:
        hint = " (a version 1 text line: use send-proxy-v2)" if bytes(view[:6]) == b"PROXY " else ""
        raise _refuse(f"no PROXY protocol v2 signature{hint}")
    if len(view) < FIXED_BYTES:
        return None
    version, command = view[12] >> 4, view[12] & 0xF
    family, transport = view[13] >> 4, view[13] & 0xF
    length = FIXED_BYTES + int.from_bytes(view[14:16], "big")
    if version != 2:
        raise _refuse(f"version {version}, not 2")
    if command not in (_LOCAL, _PROXY):
        raise _refuse(f"unknown command {command:#x}")
    if family not in (_UNSPEC, *_BLOCK):
        raise _refuse(f"unknown address family {family:#x}")
    if transport not in (_UNSPEC, _STREAM, _DGRAM):
        raise _refuse(f"unknown transport {transport:#x}")
    if length > MAX_HEADER_BYTES:
        raise _refuse(f"{length} bytes long, more than {MAX_HEADER_BYTES}")
    if command == _PROXY and family in (_INET, _INET6) and transport != _STREAM:
        raise _refuse("an INET address over a transport other than STREAM")
    if command == _PROXY and family in _BLOCK and length - FIXED_BYTES < _BLOCK[family][1]:
        raise _refuse(
            f"an address block of {length - FIXED_BYTES} bytes, "
            f"shorter than the {_BLOCK[family][1]} its family needs"
        )
    if len(view) < length:
        return None
    # A LOCAL header's block, and an UNSPEC one's, is skipped whole (the specification
    # says the receiver discards it), so only a PROXY address block's TLVs are walked.
    if command == _LOCAL or family == _UNSPEC:
        return ProxyHeader(length, None, None)
    block = view[FIXED_BYTES:length]
    tls = _read_tlvs(block[_BLOCK[family][1] :])
    if family == _UNIX:
        return ProxyHeader(length, None, None, tls)
    size = _BLOCK[family][0]
    make = ipaddress.IPv4Address if family == _INET else ipaddress.IPv6Address
    source = make(bytes(block[:size]))
    destination = make(bytes(block[size : 2 * size]))
    ports = 2 * size
    source_port = int.from_bytes(block[ports : ports + 2], "big")
    destination_port = int.from_bytes(block[ports + 2 : ports + 4], "big")
    return ProxyHeader(
        length, (source.compressed, source_port), (destination.compressed, destination_port), tls
    )


def _read_tlvs(tlvs: memoryview) -> bool:
    """Check that the TLVs fill their space exactly; whether the SSL one says TLS."""
    at, tls = 0, False
    while at < len(tlvs):
        if len(tlvs) - at < 3:
            raise _refuse("a TLV cut short")
        kind, size = tlvs[at], int.from_bytes(tlvs[at + 1 : at + 3], "big")
        value = tlvs[at + 3 : at + 3 + size]
        at += 3 + size
        if at > len(tlvs):
            raise _refuse("a TLV running past the header")
        if kind == _TYPE_SSL:
            if size < _SSL_FIXED:
                raise _refuse(f"an SSL TLV of {size} bytes, shorter than {_SSL_FIXED}")
            tls = bool(value[0] & _CLIENT_SSL)
    return tls


def build_proxy_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    *,
    tlvs: bytes = b"",
    tls: bool = False,
) -> bytes:
    """A header naming ``source`` (``None``: a ``LOCAL`` header), as a proxy writes it;
    ``tls`` adds the SSL TLV saying the client used TLS (``send-proxy-v2-ssl``).

    For tests and tools that play the proxy; the gateway only parses.
    """
    if tls:
        tlvs += bytes([_TYPE_SSL, 0, _SSL_FIXED, _CLIENT_SSL, 0, 0, 0, 0])
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(
        destination[0] if destination else ("0.0.0.0" if src.version == 4 else "::")
    )
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    family = _INET if src.version == 4 else _INET6
    ports = source[1].to_bytes(2, "big") + (destination[1] if destination else 0).to_bytes(2, "big")
    block = src.packed + dst.packed + ports + tlvs
    return (
        SIGNATURE + bytes([0x21, (family << 4) | _STREAM]) + len(block).to_bytes(2, "big") + block
    )
