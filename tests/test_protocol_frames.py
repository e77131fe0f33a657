"""The typed frames both ends share: ``identity``, ``perm_request``, ``perm_response``.

The uplink builds the first two and reads the third; the gateway reads the
first two and builds the third, all through ``protocol.frames``. Each reader
is checked on valid payloads and on every malformed shape, and each builder
against the reference's exact text.
"""

from __future__ import annotations

from typing import Any

import pytest

from protocol import (
    PERM_RESPONSE_PAYLOADS,
    Decision,
    Envelope,
    Identity,
    Kind,
    LocalProtocolError,
    PermRequest,
    Reason,
    RemoteProtocolError,
    decide,
    identity,
    parse,
    perm_response,
    serialize,
)
from protocol.frames import NO_PROJECT, NO_TOOL_NAME, NOT_AN_OBJECT

NOT_OBJECTS: list[Any] = [None, [], ["project"], "p", 0, 1.5, True]


# ── identity ───────────────────────────────────────────────────────────────


def test_identity_round_trips_with_its_extra_fields() -> None:
    text = serialize(identity("p", version="1.2", host="h"))
    assert text == (
        '{"type":"identity","req_id":"identity",'
        '"payload":{"project":"p","version":"1.2","host":"h"}}'
    )
    read = Identity.from_payload(parse(text).payload)
    assert read == Identity("p", {"version": "1.2", "host": "h"})
    assert serialize(read.envelope()) == text


def test_identity_of_a_bare_project() -> None:
    assert Identity.from_payload({"project": "p"}) == Identity("p")
    assert serialize(Identity("p").envelope()) == serialize(identity("p"))


@pytest.mark.parametrize("payload", NOT_OBJECTS)
def test_identity_payload_must_be_an_object(payload: Any) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Identity.from_payload(payload)
    assert info.value.reason == NOT_AN_OBJECT


@pytest.mark.parametrize(
    "payload",
    [{}, {"project": ""}, {"project": None}, {"project": 7}, {"project": ["p"]}, {"name": "p"}],
)
def test_identity_needs_a_project_name(payload: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Identity.from_payload(payload)
    assert info.value.reason == NO_PROJECT
    assert "project" in info.value.detail


def test_an_illegal_identity_is_not_built() -> None:
    for project in ("", None, 3):
        with pytest.raises(LocalProtocolError):
            Identity(project, {}).envelope()  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Identity("p", {"project": "q"}).envelope()


# ── perm_request ───────────────────────────────────────────────────────────


def test_perm_request_round_trips() -> None:
    sent = PermRequest("Bash", {"command": "ls -l"})
    env = parse(serialize(sent.envelope("req-1")))
    assert env.req_id == "req-1"
    assert PermRequest.from_envelope(env) == sent


def test_perm_request_without_tool_input_reads_as_none() -> None:
    assert PermRequest.from_payload({"tool_name": "Bash"}) == PermRequest("Bash", None)
    # Whitespace is a name the sled chose; only the empty string is no name.
    assert PermRequest.from_payload({"tool_name": " "}).tool_name == " "


@pytest.mark.parametrize("payload", NOT_OBJECTS)
def test_perm_request_payload_must_be_an_object(payload: Any) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        PermRequest.from_envelope(Envelope(Kind.PERM_REQUEST, "r", payload))
    assert info.value.reason == NOT_AN_OBJECT


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"tool_input": {}},
        {"tool_name": ""},
        {"tool_name": None},
        {"tool_name": 1},
        {"tool_name": ["Bash"]},
        {"tool_name": {"name": "Bash"}},
    ],
)
def test_perm_request_needs_a_tool_name(payload: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        PermRequest.from_envelope(Envelope(Kind.PERM_REQUEST, "r", payload))
    assert info.value.reason == NO_TOOL_NAME
    assert "tool_name" in str(info.value)


def test_perm_request_reads_only_its_own_kind() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        PermRequest.from_envelope(Envelope(Kind.PERM_RESPONSE, "r", {"tool_name": "Bash"}))
    assert info.value.reason == "bad_type"


# ── perm_response ──────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("decision", "text"),
    [
        (
            Decision.APPROVE,
            '{"type":"perm_response","req_id":"r1","payload":{"approved":true,"always_allow":false}}',
        ),
        (
            Decision.ALWAYS_ALLOW,
            '{"type":"perm_response","req_id":"r1","payload":{"approved":true,"always_allow":true}}',
        ),
        (
            Decision.DENY,
            '{"type":"perm_response","req_id":"r1","payload":{"approved":false,"always_allow":false}}',
        ),
    ],
)
def test_perm_response_text_and_its_reading(decision: Decision, text: str) -> None:
    env = perm_response("r1", decision)
    assert serialize(env) == text
    assert decide(parse(text).payload).decision is decision
    assert decide(env.payload).reason is Reason.GATEWAY


def test_perm_response_payloads_are_not_shared() -> None:
    perm_response("r", Decision.APPROVE).payload["approved"] = False
    assert PERM_RESPONSE_PAYLOADS[Decision.APPROVE]["approved"] is True
    assert perm_response("r", Decision.APPROVE).payload["approved"] is True
