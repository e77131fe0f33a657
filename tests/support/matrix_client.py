"""A person in a Matrix room, for tests: a real ``matrix-nio`` client on its own thread.

The tests are synchronous (the gateway runs in its own thread too), so
:class:`MatrixPerson` runs an ``AsyncClient`` on a private event loop and
offers blocking calls: create a room, join, reply, react, and wait for an
event in the room. It syncs continuously from its login onwards and keeps
every room event it sees, in order, so a test can wait on "the bot posted",
"the bot edited its message" and read the room's transcript afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomPutStateResponse,
    RoomSendResponse,
    SyncResponse,
)

T = TypeVar("T")
R = TypeVar("R")
Event = dict[str, Any]
ENCRYPTION_STATE: Event = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


class MatrixCallFailed(RuntimeError):
    """The homeserver answered a call with an error response."""


def _ok(resp: Any, expected: type[R], what: str) -> R:
    if isinstance(resp, expected):
        return resp
    raise MatrixCallFailed(f"{what}: {resp}")


class MatrixPerson:
    """One logged-in user, syncing in the background."""

    def __init__(self, homeserver: str, user_id: str, password: str) -> None:
        self.user_id = user_id
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._cond = threading.Condition()
        self.events: dict[str, list[Event]] = {}  # room id → events, in timeline order
        self._client = AsyncClient(
            homeserver, user_id, config=AsyncClientConfig(max_timeouts=0, request_timeout=20)
        )
        self._sync_task: asyncio.Task[None] | None = None
        resp = self._call(self._client.login(password=password, device_name="test"))
        _ok(resp, LoginResponse, f"{user_id} login")
        self._call(self._start_sync())

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start_sync(self) -> None:
        first = _ok(await self._client.sync(timeout=1), SyncResponse, "first sync")
        self._record(first)
        self._sync_task = asyncio.create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            try:
                resp = await self._client.sync(timeout=10_000, since=self._client.next_batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)  # the homeserver is restarting
                continue
            if isinstance(resp, SyncResponse):
                self._record(resp)
            else:
                await asyncio.sleep(0.5)

    def _record(self, resp: SyncResponse) -> None:
        with self._cond:
            for room_id, room in resp.rooms.join.items():
                seen = self.events.setdefault(room_id, [])
                ids = {e.get("event_id") for e in seen}
                for event in room.timeline.events:
                    if event.source.get("event_id") not in ids:
                        seen.append(event.source)
            self._cond.notify_all()

    def close(self) -> None:
        async def shut() -> None:
            if self._sync_task is not None:
                self._sync_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._sync_task
            await self._client.close()

        with contextlib.suppress(Exception):
            self._call(shut(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- rooms ----------------------------------------------------------------------

    def create_room(
        self, invite: list[str], name: str = "sled approvals", *, encrypted: bool = False
    ) -> str:
        """A new room; ``encrypted``: with ``m.room.encryption`` from the start (as Element
        makes a private room), whether or not this client can encrypt."""
        state = [ENCRYPTION_STATE] if encrypted else []
        resp = self._call(self._client.room_create(name=name, invite=invite, initial_state=state))
        room_id: str = _ok(resp, RoomCreateResponse, "room_create").room_id
        return room_id

    def invite(self, room_id: str, user_id: str) -> None:
        resp = self._call(self._client.room_invite(room_id, user_id))
        _ok(resp, RoomInviteResponse, "room_invite")

    def join(self, room: str) -> str:
        resp = self._call(self._client.join(room))
        room_id: str = _ok(resp, JoinResponse, "join").room_id
        return room_id

    def put_state(self, room_id: str, event: Event) -> None:
        """Set one state event (``type``, ``state_key``, ``content``), e.g. turn encryption on."""
        resp = self._call(
            self._client.room_put_state(
                room_id, event["type"], event["content"], state_key=event["state_key"]
            )
        )
        _ok(resp, RoomPutStateResponse, "room_put_state")

    # -- speaking -------------------------------------------------------------------

    def send(self, room_id: str, content: dict[str, Any], kind: str = "m.room.message") -> str:
        resp = self._call(
            self._client.room_send(room_id, kind, content, ignore_unverified_devices=True)
        )
        event_id: str = _ok(resp, RoomSendResponse, "room_send").event_id
        return event_id

    def say(self, room_id: str, text: str) -> str:
        return self.send(room_id, {"msgtype": "m.text", "body": text})

    def reply(self, room_id: str, event_id: str, text: str) -> str:
        """A rich reply, as Element sends it (no quoted fallback in the body)."""
        return self.send(
            room_id,
            {
                "msgtype": "m.text",
                "body": text,
                "m.relates_to": {"m.in_reply_to": {"event_id": event_id}},
            },
        )

    def react(self, room_id: str, event_id: str, key: str) -> str:
        return self.send(
            room_id,
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}},
            kind="m.reaction",
        )

    # -- listening ------------------------------------------------------------------

    def wait_event(
        self, room_id: str, predicate: Callable[[Event], bool], timeout: float, what: str
    ) -> Event:
        """The first event in the room (seen so far or later) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events.get(room_id, []):
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.user_id} did not see {what} within {timeout:.0f} s; "
                        f"room has: {transcript(self.events.get(room_id, []))}"
                    )
                self._cond.wait(min(left, 0.5))

    def room_events(self, room_id: str) -> list[Event]:
        with self._cond:
            return list(self.events.get(room_id, []))


def body(event: Event) -> str:
    content = event.get("content") or {}
    text = content.get("body")
    return text if isinstance(text, str) else ""


def is_message(event: Event) -> bool:
    return event.get("type") == "m.room.message"


def edit_of(event: Event) -> str | None:
    """The event id this message edits (``m.replace``), if it is an edit."""
    rel = (event.get("content") or {}).get("m.relates_to") or {}
    if rel.get("rel_type") == "m.replace":
        target = rel.get("event_id")
        return target if isinstance(target, str) else None
    return None


def reply_to(event: Event) -> str | None:
    rel = (event.get("content") or {}).get("m.relates_to") or {}
    target = (rel.get("m.in_reply_to") or {}).get("event_id")
    return target if isinstance(target, str) else None


def transcript(events: list[Event]) -> str:
    """The room's messages and reactions, one per line: ``sender: body``."""
    lines = []
    for event in events:
        content = event.get("content") or {}
        if event.get("type") == "m.room.message":
            rel = content.get("m.relates_to") or {}
            tag = ""
            if rel.get("rel_type") == "m.replace":
                tag = f"[edit of {rel.get('event_id')}] "
                text = (content.get("m.new_content") or {}).get("body", "")
            else:
                text = content.get("body", "")
                if reply_to(event):
                    tag = f"[reply to {reply_to(event)}] "
            lines.append(f"{event.get('sender')} ({event.get('event_id')}): {tag}{text}")
        elif event.get("type") == "m.reaction":
            rel = content.get("m.relates_to") or {}
            lines.append(
                f"{event.get('sender')}: [reaction {rel.get('key')} to {rel.get('event_id')}]"
            )
    return "\n".join(lines)
