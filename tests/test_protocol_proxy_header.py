"""``protocol.proxy_header``: the PROXY protocol v2 header, bytes in and values out.

The headers here are built by hand from the specification's layout (HAProxy's
``doc/proxy-protocol.txt``, section 2.2), not only by ``build_proxy_v2``, so
that the builder and the parser cannot agree on a mistake.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import RemoteProtocolError
from protocol.proxy_header import (
    MAX_HEADER_BYTES,
    SIGNATURE,
    ProxyHeader,
    build_proxy_v2,
    parse_proxy_v2,
)

#: PROXY, INET, STREAM: 192.0.2.7:51000 → 10.0.0.11:8080, as HAProxy writes it.
INET = (
    b"\r\n\r\n\x00\r\nQUIT\n"
    + b"\x21\x11\x00\x0c"
    + bytes([192, 0, 2, 7, 10, 0, 0, 11])
    + (51000).to_bytes(2, "big")
    + (8080).to_bytes(2, "big")
)
#: What HAProxy's health checks send: LOCAL, UNSPEC, no address block.
LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def test_an_inet_header_names_the_client_and_what_follows_is_left() -> None:
    got = parse_proxy_v2(INET + b"GET / HTTP/1.1\r\n")
    assert got == ProxyHeader(28, ("192.0.2.7", 51000), ("10.0.0.11", 8080))


def test_an_inet6_header_names_the_client() -> None:
    header = (
        SIGNATURE
        + b"\x21\x21\x00\x24"
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("20010db8000000000000000000000002")
        + (443).to_bytes(2, "big")
        + (8080).to_bytes(2, "big")
    )
    got = parse_proxy_v2(header)
    assert got == ProxyHeader(52, ("2001:db8::1", 443), ("2001:db8::2", 8080))
    assert build_proxy_v2(("2001:db8::1", 443), ("2001:db8::2", 8080)) == header


def test_the_builder_writes_what_haproxy_writes() -> None:
    assert build_proxy_v2(("192.0.2.7", 51000), ("10.0.0.11", 8080)) == INET
    assert build_proxy_v2(None) == LOCAL


@pytest.mark.parametrize(
    "header",
    [
        LOCAL,
        # LOCAL with an address block: the receiver skips it whole.
        SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12),
        # PROXY over UNSPEC: nothing is named, the connection's peer stands.
        SIGNATURE + b"\x21\x00\x00\x00",
        # PROXY over UNIX sockets: no IP address to count.
        SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216),
    ],
    ids=["local", "local-with-block", "unspec", "unix"],
)
def test_a_header_naming_no_client_leaves_the_peer_standing(header: bytes) -> None:
    assert parse_proxy_v2(header) == ProxyHeader(len(header), None, None)


def test_tlvs_are_walked_and_ignored() -> None:
    tlvs = b"\x05\x00\x03abc" + b"\x04\x00\x00"  # UNIQUE_ID "abc", a NOOP of length 0
    header = build_proxy_v2(("192.0.2.7", 1), ("10.0.0.11", 2), tlvs=tlvs)
    assert parse_proxy_v2(header) == ProxyHeader(len(header), ("192.0.2.7", 1), ("10.0.0.11", 2))


def test_the_ssl_tlv_says_whether_the_client_used_tls() -> None:
    # PP2_TYPE_SSL: client flags (PP2_CLIENT_SSL = 1), verify (0: verified), a
    # PP2_SUBTYPE_SSL_VERSION sub-TLV, as HAProxy's send-proxy-v2-ssl writes it.
    ssl = b"\x20\x00\x0c" + b"\x01" + bytes(4) + b"\x21\x00\x04TLS3"
    header = build_proxy_v2(("192.0.2.7", 1), ("10.0.0.11", 2), tlvs=ssl)
    assert parse_proxy_v2(header) == ProxyHeader(
        len(header), ("192.0.2.7", 1), ("10.0.0.11", 2), tls=True
    )
    assert build_proxy_v2(("192.0.2.7", 1), tls=True)[-8:] == b"\x20\x00\x05\x01" + bytes(4)
    plain = build_proxy_v2(("192.0.2.7", 1), tlvs=b"\x20\x00\x05" + b"\x00" + bytes(4))
    got = parse_proxy_v2(plain)
    assert got is not None and got.tls is False


def test_every_prefix_is_incomplete_and_the_whole_is_a_header() -> None:
    for end in range(len(INET)):
        assert parse_proxy_v2(INET[:end]) is None, end
    assert parse_proxy_v2(INET) is not None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol v2 signature"),
        (b"G", "no PROXY protocol v2 signature"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.11 51000 8080\r\n", "a version 1 text line"),
        (SIGNATURE[:11] + b"X", "no PROXY protocol v2 signature"),
        (SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1, not 2"),
        (SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 0x2"),
        (SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family 0x4"),
        (SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "unknown transport 0x3"),
        (SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "other than STREAM"),
        (SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "shorter than the 12"),
        (SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "shorter than the 36"),
        (SIGNATURE + b"\x21\x11\xff\xff", f"more than {MAX_HEADER_BYTES}"),
        (SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x05\x00", "a TLV cut short"),
        (SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x05\x00\x09x", "running past"),
        (SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x20\x00\x01\x01", "an SSL TLV"),
    ],
)
def test_a_malformed_header_is_refused_naming_the_problem(data: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError) as refused:
        parse_proxy_v2(data)
    assert refused.value.reason == "proxy_header"
    assert why in refused.value.detail


def test_a_refusal_comes_before_the_rest_of_a_header_that_cannot_be() -> None:
    # Version 1 is refused from its fixed part: nothing waits for 65535 more bytes.
    with pytest.raises(RemoteProtocolError):
        parse_proxy_v2(SIGNATURE + b"\x11\x11\xff\x00")


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_a_clean_refusal(data: bytes) -> None:
    try:
        got = parse_proxy_v2(data)
    except RemoteProtocolError:
        return
    assert got is None or 16 <= got.length <= len(data)


@given(st.binary(max_size=120))
def test_any_bytes_after_the_signature_give_a_header_none_or_a_clean_refusal(
    rest: bytes,
) -> None:
    try:
        got = parse_proxy_v2(SIGNATURE + rest)
    except RemoteProtocolError:
        return
    assert got is None or 16 <= got.length <= len(SIGNATURE) + len(rest)
