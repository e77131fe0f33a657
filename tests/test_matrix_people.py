"""Matrix votes are people's votes: with ``--access``, the bot's room against a real Synapse.

The access file maps Matrix user ids to people (``[[person]] matrix = ...``);
a reply or a reaction from a mapped user is that person's vote, under the
person's roles on the sled's project and the quorum, through the one
approvals path. Everyone else is refused in the thread, with the reason.

The bot's allow list (``--matrix-operators``) names every user in the room
here, as a deployment that let the whole team answer from Matrix before
people existed would: each attack below decided the request on the gateway
before the access file ruled the room, and is refused now.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("nio", reason="matrix-nio is not installed (the 'matrix' extra)")

from actors import Uplink
from protocol import ConfigError, Decision
from sled_gateway import Gateway
from sled_gateway.access import load_access
from sled_gateway.transports.matrix import MatrixTransport, config_from_options
from tests.conftest import REFERENCE_TOKEN, closed_port
from tests.support.matrix_client import MatrixPerson, body, reply_to
from tests.support.synapse import Synapse, homeserver_with
from tests.test_matrix import (
    BOT,
    PASSWORDS,
    ROOT,
    Homeserver,
    Setup,
    T,
    bot_config,
    by_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

# Matrix users: two approvers of web-*, a viewer of web-*, an approver of api-*,
# and an outsider whom no [[person]] claims.
USERS = {
    "alice": "alice-pw-Lm2",
    "bob": "bob-pw-Rt5",
    "vera": "vera-pw-Kp3",
    "dave": "dave-pw-Wq8",
    "mallory": "mallory-pw-Zz9",
}
M = {name: f"@{name}:localhost" for name in USERS}
ALICE, BOB, VERA, DAVE = (f"{n}@example.test" for n in ("alice", "bob", "vera", "dave"))

ACCESS = f"""\
[[grant]]
who = "{ALICE}"
role = "approver"
projects = ["web-*"]

[[grant]]
who = "{BOB}"
role = "approver"
projects = ["web-*"]

[[grant]]
who = "{VERA}"
role = "viewer"
projects = ["web-*"]

[[grant]]
who = "{DAVE}"
role = "approver"
projects = ["api-*"]

[[quorum]]
rule = "Bash(git push *)"
approvals = 2
projects = ["web-*"]

[[person]]
id = "{ALICE}"
matrix = "{M["alice"]}"

[[person]]
id = "{BOB}"
matrix = "{M["bob"]}"

[[person]]
id = "{VERA}"
matrix = "{M["vera"]}"

[[person]]
id = "{DAVE}"
matrix = "{M["dave"]}"
"""
PUSH = {"command": "git push --force origin main"}


@dataclass
class Team:
    synapse: Synapse
    people: dict[str, MatrixPerson]


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    directory = tmp_path_factory.mktemp("synapse-people")
    accounts = {"bot": PASSWORDS["bot"], **USERS}
    with homeserver_with(directory, accounts, {name: M[name] for name in USERS}) as found:
        yield Team(*found)


@pytest.fixture
def room_setup(team: Team, tmp_path: Path) -> Iterator[Setup]:
    alice = team.people["alice"]
    room = alice.create_room(invite=[BOT, *(M[n] for n in USERS if n != "alice")])
    for name in USERS:
        if name != "alice":
            team.people[name].join(room)
    path = tmp_path / "access.toml"
    path.write_text(ACCESS)
    gw = Gateway(token=REFERENCE_TOKEN, access=load_access(path)).start()
    hs = Homeserver(team.synapse, alice, team.people["mallory"])
    config = bot_config(hs, room, operators=frozenset(M.values()))
    bot = MatrixTransport(gw, config).start()
    try:
        wait_until(lambda: bot.connected, T, "the bot connected and joined")
        yield Setup(gw, bot, room, hs)
    finally:
        bot.stop()
        gw.stop()


def reply(setup: Setup, team: Team, name: str, event_id: str, text: str) -> str:
    """``name`` replies ``text`` to ``event_id``; the bot's answer to that reply."""
    sent = team.people[name].reply(setup.room, event_id, text)
    return setup.bot_reply(sent)


def bot_replies_to(setup: Setup, event_id: str) -> list[str]:
    events = setup.hs.alice.room_events(setup.room)
    return [body(e) for e in events if e["sender"] == BOT and reply_to(e) == event_id]


def ballot(gw: Gateway, project: str, req_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client:
        shown = client.get(f"/api/permissions/{project}/{req_id}")
    assert shown.status_code == 200, shown.text
    result: dict[str, Any] = shown.json()
    return result


def test_an_unmapped_user_on_the_allow_list_is_refused_and_decides_nothing(
    room_setup: Setup, team: Team, make_uplink: Callable[..., Uplink]
) -> None:
    uplink = room_setup.sled(make_uplink, project="web-1")
    outcome = uplink.request_permission("Bash", {"command": "make"}, request_id="r-out")
    post = room_setup.posted("r-out")
    refusal = reply(room_setup, team, "mallory", post["event_id"], "approve")
    assert refusal.startswith(f"{M['mallory']}: not a known person"), refusal
    assert room_setup.gw.is_pending("web-1", "r-out")
    # A reaction decides nothing either, and the refusal is not said again (rate-limited).
    team.people["mallory"].react(room_setup.room, post["event_id"], "✅")
    # A mapped approver's answer is handled after the reaction: nothing was decided by then.
    reply_id = team.people["alice"].reply(room_setup.room, post["event_id"], "approve")
    assert outcome.result(T).decision is Decision.APPROVE
    assert by_of(room_setup.gw, "r-out") == f"approve by {ALICE}"
    assert room_setup.edit(post["event_id"]).startswith(f"✅ APPROVED by {ALICE}")
    row = next(r for r in room_setup.gw.audit() if r["req_id"] == "r-out")
    assert (row["who"], row["channel"], row["by"]) == (ALICE, "matrix", ALICE)
    assert bot_replies_to(room_setup, reply_id) == []
    assert len(bot_replies_to(room_setup, post["event_id"])) == 0  # the reaction: no refusal


def test_a_mapped_viewer_is_refused_as_a_viewer(
    room_setup: Setup, team: Team, make_uplink: Callable[..., Uplink]
) -> None:
    uplink = room_setup.sled(make_uplink, project="web-1")
    outcome = uplink.request_permission("Bash", {"command": "rm -rf dist"}, request_id="r-view")
    post = room_setup.posted("r-view")
    refusal = reply(room_setup, team, "vera", post["event_id"], "approve")
    assert refusal == (
        f"{M['vera']}: {VERA} is a viewer of sled 'web-1': answering needs the approver role."
    )
    team.people["vera"].react(room_setup.room, post["event_id"], "✅")
    team.people["bob"].reply(room_setup.room, post["event_id"], "deny")
    assert outcome.result(T).decision is Decision.DENY
    assert by_of(room_setup.gw, "r-view") == f"deny by {BOB}"


def test_an_approver_of_another_project_is_refused(
    room_setup: Setup, team: Team, make_uplink: Callable[..., Uplink]
) -> None:
    uplink = room_setup.sled(make_uplink, project="web-1")
    outcome = uplink.request_permission("Bash", {"command": "make deploy"}, request_id="r-api")
    post = room_setup.posted("r-api")
    refusal = reply(room_setup, team, "dave", post["event_id"], "always")
    assert refusal == (
        f"{M['dave']}: {DAVE} has no role on sled 'web-1': answering needs the approver role on it."
    )
    assert room_setup.gw.is_pending("web-1", "r-api")
    assert room_setup.gw.rules() == []
    team.people["alice"].react(room_setup.room, post["event_id"], "❌")
    assert outcome.result(T).decision is Decision.DENY
    assert by_of(room_setup.gw, "r-api") == f"deny by {ALICE}"


def test_two_people_make_a_quorum_of_two_by_replies_and_one_cannot_vote_twice(
    room_setup: Setup, team: Team, make_uplink: Callable[..., Uplink]
) -> None:
    uplink = room_setup.sled(make_uplink, project="web-1")
    outcome = uplink.request_permission("Bash", PUSH, request_id="push")
    post = room_setup.posted("push")
    assert ballot(room_setup.gw, "web-1", "push")["needs"] == 2
    counted = reply(room_setup, team, "alice", post["event_id"], "approve")
    assert counted == f"1 of 2 approvals: {ALICE}"
    again = reply(room_setup, team, "alice", post["event_id"], "always")
    assert "already voted" in again and ALICE in again, again
    assert room_setup.gw.is_pending("web-1", "push")
    assert [v["person"] for v in ballot(room_setup.gw, "web-1", "push")["votes"]] == [ALICE]
    assert not outcome.done()

    team.people["bob"].reply(room_setup.room, post["event_id"], "approve")
    assert outcome.result(T).decision is Decision.APPROVE
    assert by_of(room_setup.gw, "push") == f"approve by {BOB}"
    done = ballot(room_setup.gw, "web-1", "push")
    assert done["state"] == "approve" and done["needs"] == 2
    assert [(v["person"], v["channel"]) for v in done["votes"]] == [
        (ALICE, "matrix"),
        (BOB, "matrix"),
    ]
    row = next(r for r in room_setup.gw.audit() if r["req_id"] == "push")
    assert (row["who"], row["channel"]) == (BOB, "matrix")
    assert row["reason"] == f"quorum 2 of 2: {ALICE}, {BOB}"
    assert room_setup.gw.rules() == []  # the "always" vote made no rule
    print(f"\n--- room transcript (quorum) ---\n{room_setup.transcript()}\n---")


def test_the_sleds_owner_cannot_approve_alone_from_the_room(
    room_setup: Setup, team: Team, make_uplink: Callable[..., Uplink]
) -> None:
    uplink = room_setup.sled(make_uplink, project="web-2", owner=ALICE)
    outcome = uplink.request_permission("Bash", PUSH, request_id="own")
    post = room_setup.posted("own")
    refused = reply(room_setup, team, "alice", post["event_id"], "approve")
    assert "the owner cannot approve" in refused, refused
    counted = reply(room_setup, team, "bob", post["event_id"], "approve")
    assert counted == f"1 of 2 approvals: {BOB}"
    assert room_setup.gw.is_pending("web-2", "own")
    assert not outcome.done()


def test_with_access_the_allow_list_is_optional(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw")
    secret.chmod(0o600)
    options: dict[str, Any] = {
        "homeserver": "http://127.0.0.1:8008",
        "user": BOT,
        "password_file": str(secret),
        "access_token_file": None,
        "room": "#r:localhost",
        "operators": None,
    }
    config = config_from_options(**options, people=True)
    assert config is not None and config.operators == frozenset()
    with pytest.raises(ConfigError, match="--matrix-operators: required"):
        config_from_options(**options)  # without --access the allow list is who answers


def test_run_gateway_with_access_and_no_allow_list(
    team: Team, tmp_path: Path, make_uplink: Callable[..., Uplink]
) -> None:
    """``run_gateway.py --access FILE --matrix-*`` without ``--matrix-operators``: the file's
    people answer from the room, the outsider is refused."""
    alice, mallory = team.people["alice"], team.people["mallory"]
    room = alice.create_room(invite=[BOT, M["mallory"]])
    mallory.join(room)
    access = tmp_path / "access.toml"
    access.write_text(ACCESS)
    password_file = tmp_path / "bot-password"
    password_file.write_text(PASSWORDS["bot"] + "\n")
    password_file.chmod(0o600)
    port = closed_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run_gateway.py"),
            "--listen",
            f"127.0.0.1:{port}",
            "--access",
            str(access),
            "--matrix-homeserver",
            team.synapse.url,
            "--matrix-user",
            BOT,
            "--matrix-password-file",
            str(password_file),
            "--matrix-room",
            room,
        ],
        cwd=ROOT,
        env={**os.environ, "SLED_GATEWAY_TOKEN": REFERENCE_TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[bytes] = []
    pump = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    pump.start()

    def text() -> str:
        return b"".join(output).decode(errors="replace")

    try:
        try:
            wait_until(lambda: "matrix: joined" in text(), T, "the bot joined")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; output:\n{text()}") from None
        assert f"the access file's people: {M['alice']}" in text()
        url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={REFERENCE_TOKEN}"
        uplink = make_uplink(url, project="web-cli")
        assert uplink.wait_connected(T)
        outcome = uplink.request_permission("Bash", {"command": "uptime"}, request_id="r-cli")
        post = alice.wait_event(
            room,
            lambda e: e["sender"] == BOT and "Request: r-cli\n" in body(e),
            T,
            "the post of r-cli",
        )
        attempt = mallory.reply(room, post["event_id"], "approve")
        try:
            refusal = alice.wait_event(
                room, lambda e: e["sender"] == BOT and reply_to(e) == attempt, T, "the refusal"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the gateway's output:\n{text()}") from None
        assert "not a known person" in body(refusal)
        assert not outcome.done()
        alice.reply(room, post["event_id"], "approve")
        assert outcome.result(T).decision is Decision.APPROVE
    finally:
        proc.terminate()
        proc.wait(20)
        pump.join(5)
    log = text()
    assert proc.returncode == 0, log
    assert f"approve by {ALICE}" in log


def test_a_vote_from_matrix_and_one_from_the_api_by_the_same_person_are_one_vote(
    room_setup: Setup, team: Team, make_uplink: Callable[..., Uplink]
) -> None:
    gw = room_setup.gw
    with httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as operator:
        made = {
            p: operator.post("/api/tokens", json={"person": p, "expires_in": 600})
            for p in (ALICE, BOB)
        }
    tokens = {p: r.json()["token"] for p, r in made.items()}
    uplink = room_setup.sled(make_uplink, project="web-1")
    outcome = uplink.request_permission("Bash", PUSH, request_id="mixed")
    post = room_setup.posted("mixed")
    assert (
        reply(room_setup, team, "alice", post["event_id"], "approve")
        == f"1 of 2 approvals: {ALICE}"
    )

    def vote(person: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {tokens[person]}"}
        with httpx.Client(base_url=gw.http_url, headers=headers, timeout=T) as client:
            return client.post("/api/permissions/web-1/mixed", json={"decision": "approve"})

    again = vote(ALICE)
    assert again.status_code == 409 and "already voted" in again.json()["error"], again.text
    assert gw.is_pending("web-1", "mixed")
    assert vote(BOB).status_code == 200
    assert outcome.result(T).decision is Decision.APPROVE
    votes = ballot(gw, "web-1", "mixed")["votes"]
    assert [(v["person"], v["channel"]) for v in votes] == [(ALICE, "matrix"), (BOB, "api")]
