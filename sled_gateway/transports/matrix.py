"""Approve from a chat room: the gateway's Matrix transport (a ``matrix-nio`` bot).

The bot runs as one task on the gateway's own event loop, so it shares the
loop with the console and the API and must never block it: every homeserver
call is an ``await``, and the gateway's listeners only put work on a queue.

What it does, in one room:

- each pending permission request is posted (sled, tool, a shortened input,
  the full input in a code block, how to answer), every control, bidi and
  zero-width character in it shown as an escape;
- an operator answers by *replying* to that message with ``approve``,
  ``deny`` or ``always`` (or by reacting with ✅ / ❌ / 🔁); only the listed
  operators can decide, anyone else gets a short refusal in reply (at most
  one per person a minute); with an ``--access`` file, its people answer
  instead: a user id a ``[[person]]`` maps votes as that person, under their
  roles on the sled's project and the quorum, and the refusal says why;
- a message answers only the request *instance* it shows: once that one is
  decided or withdrawn, a reply to it decides nothing, even when a new
  request reuses its id; an input the message had to clip can be denied
  from the room but approved only in the console;
- the first valid answer wins, whichever transport gave it; the bot then
  edits its message with the outcome and who gave it, and does the same for
  a request withdrawn because its sled went away;
- when the homeserver is down (at start or later) it retries with capped
  exponential back-off, and on reconnect re-posts whatever is still pending.

Events from before the bot's first sync, from other rooms, and the bot's own
messages are ignored. The password and the access token are read from files
that only their owner may read, and never appear in a log line (nio's own
loggers are held at WARNING and scrubbed too); a plain ``http://``
homeserver is accepted only on loopback. End-to-end encrypted rooms are not
supported: the bot cannot encrypt, so in such a room it posts no input, only
a notice pointing to the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import json
import logging
import os
import random
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loguru import logger

from actors.cli import Option
from protocol import ConfigError, Decision, decision_word, printable, show_invisible
from sled_gateway.approvals import Forbidden, NotRecorded, VoteCounted, VoteRefused
from sled_gateway.principal import Channel, Principal, Role
from sled_gateway.records import (
    WITHDRAWN,
    AlreadyDecided,
    DecisionRecord,
    InputMismatch,
    PendingPermission,
    UnknownRequest,
)
from sled_gateway.speaker import SpeakerLock
from sled_gateway.store.postgresql import is_postgresql

if TYPE_CHECKING:
    from sled_gateway.server import Gateway

log = logger.bind(actor="matrix")

#: Reaction keys (emoji) and the decision each means.
REACTIONS: dict[str, Decision] = {
    "✅": Decision.APPROVE,
    "👍": Decision.APPROVE,
    "❌": Decision.DENY,
    "👎": Decision.DENY,
    "🔁": Decision.ALWAYS_ALLOW,
}
OUTCOME_WORDS: dict[str, str] = {
    Decision.APPROVE.value: "✅ APPROVED",
    Decision.ALWAYS_ALLOW.value: "🔁 ALWAYS ALLOWED",
    Decision.DENY.value: "❌ DENIED",
    WITHDRAWN: "⏹ WITHDRAWN",
}
SUMMARY_CHARS = 200  # the one-line input summary
FULL_INPUT_CHARS = 16_000  # a Matrix event is at most 64 KiB; leave room for HTML
# What the full input may weigh in the event, as JSON in the body plus as HTML in
# the formatted body: ``<`` is 4 bytes there, ``\`` 2 in JSON, ``中`` 3 in UTF-8.
FULL_INPUT_BYTES = 44_000
SYNC_TIMEOUT_MS = 30_000  # long-poll
REQUEST_TIMEOUT_S = 15.0  # one non-sync call to the homeserver
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
REFUSAL_INTERVAL_S = 60.0  # at most one refusal per outsider in this time

_NIO_LOGGERS = ("nio", "aiohttp", "peewee")
_EVENT_MEMORY = 10_000
_REFUSED_MEMORY = 10_000
#: Answers to a message the bot has not yet heard back about from the homeserver,
#: held until it has (bounded: a flood of replies to unknown messages is dropped).
_EARLY_MEMORY = 100
_FIRST_SYNC_FILTER = {"room": {"timeline": {"limit": 1}}, "presence": {"types": []}}


@dataclass(frozen=True)
class MatrixConfig:
    """Where and as whom the bot runs, and whom it obeys."""

    homeserver: str
    user_id: str
    room: str  # a room id (!x:server) or an alias (#x:server)
    operators: frozenset[str]
    password: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    device_name: str = "sled-gateway"
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX

    def __post_init__(self) -> None:
        if (self.password is None) == (self.access_token is None):
            raise ConfigError("--matrix-password-file", "give exactly one of a password or a token")
        _check_homeserver(self.homeserver)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_homeserver(url: str) -> None:
    """An ``https://`` URL, or ``http://`` to this machine: the password, the token and
    every request's input cross this connection, so plain text may not leave the host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        parts, host = None, ""
    if parts is None or parts.scheme not in ("http", "https") or not host or len(url) < 10:
        raise ConfigError("--matrix-homeserver", f"expected an http(s):// URL, not {url!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(
            "--matrix-homeserver",
            f"plain http:// is allowed only to loopback (127.0.0.0/8, ::1, localhost), "
            f"not {host!r}: use https://",
        )


def _is_user_id(text: str) -> bool:
    local, sep, server = text[1:].partition(":")
    return (
        text.startswith("@")
        and bool(sep and local and server)
        and not any(c.isspace() for c in text)
    )


def _read_secret(option: str, path: str) -> str:
    try:
        mode = os.stat(path).st_mode
        # A regular file others can read leaks the bot's account; a pipe or a
        # device (/dev/stdin, <(...)) is not a file someone else can open later.
        if os.name == "posix" and stat.S_ISREG(mode) and mode & 0o077:
            raise ConfigError(
                option,
                f"{path!r} is open to group or others (mode {stat.S_IMODE(mode):04o}): "
                f"chmod 600 {path}",
            )
        text = Path(path).read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigError(option, f"cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(option, f"{path!r} is not UTF-8 text") from None
    if not text or "\n" in text:
        raise ConfigError(option, f"{path!r} must hold one non-empty line")
    return text


#: The command line's ``--matrix-*`` options, keyed by :func:`config_from_options`'s
#: parameters. They are checked together there (each is required with the
#: others), so they carry no value rule of their own.
MATRIX_OPTIONS: dict[str, Option] = {
    "homeserver": Option(
        "--matrix-homeserver",
        "the bot's homeserver, e.g. https://matrix.org (http:// only on loopback; "
        "the --matrix-* options go together)",
        metavar="URL",
        default=None,
    ),
    "user": Option("--matrix-user", "the bot's user id", metavar="@BOT:SERVER", default=None),
    "password_file": Option(
        "--matrix-password-file",
        "a file holding the bot's password (chmod 600)",
        metavar="PATH",
        default=None,
    ),
    "access_token_file": Option(
        "--matrix-access-token-file",
        "a file holding the bot's access token (instead of a password; chmod 600)",
        metavar="PATH",
        default=None,
    ),
    "room": Option(
        "--matrix-room", "room id (!id) or alias (#name:server)", metavar="ROOM", default=None
    ),
    "operators": Option(
        "--matrix-operators",
        "who may answer from the room (comma-separated user ids); with --access its "
        "people answer instead (docs/matrix.md)",
        metavar="@A:SERVER,...",
        default=None,
    ),
}


def config_from_options(
    *,
    homeserver: str | None,
    user: str | None,
    password_file: str | None,
    access_token_file: str | None,
    room: str | None,
    operators: str | None,
    people: bool = False,
) -> MatrixConfig | None:
    """The command line's ``--matrix-*`` options → a config (None when none was given).

    ``people``: the gateway has an ``--access`` file, whose people answer from
    the room; ``--matrix-operators`` is then optional (and names no one who
    is not also one of them).

    Raises :class:`ConfigError` naming the first unusable option, so a bad
    value stops the gateway before it starts instead of failing in the loop.
    """
    given = {
        "--matrix-homeserver": homeserver,
        "--matrix-user": user,
        "--matrix-room": room,
        "--matrix-operators": operators,
    }
    secrets_given = password_file is not None or access_token_file is not None
    if all(v is None for v in given.values()) and not secrets_given:
        return None
    for option, value in given.items():
        if not value and not (people and option == "--matrix-operators" and value is None):
            raise ConfigError(option, "required with the other --matrix-* options")
    assert homeserver
    assert user
    assert room
    if password_file is not None and access_token_file is not None:
        raise ConfigError(
            "--matrix-password-file", "cannot be combined with --matrix-access-token-file"
        )
    _check_homeserver(homeserver)
    if not _is_user_id(user):
        raise ConfigError(
            "--matrix-user", f"expected a Matrix user id like @bot:example.org, not {user!r}"
        )
    # Room ids of room version 12 have no ":server" part; aliases always do.
    is_id = room.startswith("!") and len(room) > 1
    is_alias = room.startswith("#") and ":" in room[2:]
    if not (is_id or is_alias) or any(c.isspace() for c in room):
        raise ConfigError(
            "--matrix-room",
            f"expected a room id (!id) or an alias (#name:server), not {room!r}",
        )
    names = [name.strip() for name in (operators or "").split(",") if name.strip()]
    if not names and not people:
        raise ConfigError("--matrix-operators", "name at least one operator (@user:server)")
    for name in names:
        if not _is_user_id(name):
            raise ConfigError("--matrix-operators", f"{name!r} is not a Matrix user id")
    if user in names:
        raise ConfigError("--matrix-operators", "the bot cannot be its own operator")
    if password_file is None and access_token_file is None:
        raise ConfigError(
            "--matrix-password-file", "required (or --matrix-access-token-file) with --matrix-user"
        )
    password = (
        _read_secret("--matrix-password-file", password_file) if password_file is not None else None
    )
    token = (
        _read_secret("--matrix-access-token-file", access_token_file)
        if access_token_file is not None
        else None
    )
    return MatrixConfig(
        homeserver=homeserver.rstrip("/"),
        user_id=user,
        room=room,
        operators=frozenset(names),
        password=password,
        access_token=token,
    )


class _ScrubFilter(logging.Filter):
    """Drop the bot's secrets from any stdlib record (nio, aiohttp) before it is handled."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = message
        for secret in self.secrets:
            cleaned = cleaned.replace(secret, "***")
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _input_text(tool_input: Any) -> str:
    if isinstance(tool_input, str):
        return tool_input
    try:
        return json.dumps(tool_input, ensure_ascii=False, indent=2, sort_keys=True)
    except (TypeError, ValueError):
        return repr(tool_input)


def _summary(tool_input: Any) -> str:
    """One line: a Bash command as itself, anything else as compact JSON (escaped)."""
    if isinstance(tool_input, dict) and isinstance(tool_input.get("command"), str):
        text = tool_input["command"]
    elif isinstance(tool_input, str):
        text = tool_input
    else:
        try:
            text = json.dumps(tool_input, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            text = repr(tool_input)
    return _shorten(printable(" ".join(text.split())), SUMMARY_CHARS)


def _names(item: PendingPermission) -> tuple[str, str, str, bool]:
    """The sled, the tool and the request id as shown (escaped and shortened), and
    whether shortening cut one of them."""
    project, tool, req_id = (
        printable(item.project),
        printable(item.tool_name),
        printable(item.req_id),
    )
    cut = len(project) > 100 or len(tool) > 100 or len(req_id) > 200
    return _shorten(project, 100), _shorten(tool, 100), _shorten(req_id, 200), cut


def _event_bytes(ch: str) -> int:
    in_body = len(json.dumps(ch, ensure_ascii=False).encode("utf-8", "surrogatepass")) - 2
    in_html = len(json.dumps(html.escape(ch), ensure_ascii=False).encode("utf-8")) - 2
    return in_body + in_html


def _clip(full: str) -> tuple[str, bool]:
    """``full`` cut to what one event can carry (in characters and in bytes)."""
    clipped = len(full) > FULL_INPUT_CHARS
    full = full[:FULL_INPUT_CHARS]
    if len(full) * 12 > FULL_INPUT_BYTES:  # else even the heaviest characters fit
        total = 0
        for i, ch in enumerate(full):
            total += _event_bytes(ch)
            if total > FULL_INPUT_BYTES:
                return full[:i], True
    return full, clipped


def _request_message(item: PendingPermission, *, repost: bool) -> tuple[dict[str, Any], bool]:
    """The content announcing one pending request, and whether it clipped anything
    a person decides on (then only the console may approve it)."""
    full, clipped = _clip(show_invisible(_input_text(item.tool_input)))
    project, tool, req_id, cut = _names(item)
    note = (
        f"\n(input clipped at {len(full)} characters: deny here, approve only "
        "in the gateway's console)"
        if clipped or cut
        else ""
    )
    head = "Still pending" if repost else "Permission request"
    summary = _summary(item.tool_input)
    body = (
        f"🔐 {head}: sled '{project}' wants to run {tool}\n"
        f"Input: {summary}\n"
        f"Request: {req_id}\n"
        f"```\n{full}\n```{note}\n"
        "Reply to this message with approve, deny or always (or react ✅ ❌ 🔁)."
    )
    esc = html.escape
    formatted = (
        f"🔐 <b>{esc(head)}</b>: sled <code>{esc(project)}</code> wants to run "
        f"<b>{esc(tool)}</b><br>"
        f"Input: <code>{esc(summary)}</code><br>"
        f"Request: <code>{esc(req_id)}</code>"
        f"<pre><code>{esc(full)}</code></pre>{esc(note)}"
        "Reply to this message with <b>approve</b>, <b>deny</b> or <b>always</b> "
        "(or react ✅ ❌ 🔁)."
    )
    content = {
        "msgtype": "m.text",
        "body": body,
        "format": "org.matrix.custom.html",
        "formatted_body": formatted,
    }
    return content, clipped or cut


def request_message(item: PendingPermission, *, repost: bool = False) -> dict[str, Any]:
    """The ``m.room.message`` content announcing one pending request."""
    return _request_message(item, repost=repost)[0]


def encrypted_notice(item: PendingPermission) -> dict[str, Any]:
    """What stands for a request in an encrypted room: no input, a pointer to the console."""
    project, tool, req_id, _ = _names(item)
    text = (
        f"🔐 Permission request: sled '{project}' wants to run {tool} (request {req_id}). "
        "This room is end-to-end encrypted and the bot cannot encrypt, so the input is not "
        "posted here: answer it in the gateway's console."
    )
    return {"msgtype": "m.notice", "body": text}


def outcome_text(record: DecisionRecord) -> str:
    """The line that replaces a request's message once it is settled."""
    word = OUTCOME_WORDS.get(record.decision, printable(record.decision.upper()))
    by = printable(record.by)
    why = "the sled went away" if record.by == "sled_disconnected" else by
    how = f"({why})" if record.decision == WITHDRAWN else f"by {by}"
    project, tool, req_id = (
        _shorten(printable(record.project), 100),
        _shorten(printable(record.tool_name), 100),
        printable(record.req_id),
    )
    return (
        f"{word} {how}: {tool} for sled '{project}' "
        f"(request {req_id}, after {record.waited_s:.1f} s)"
    )


def edit_content(event_id: str, text: str) -> dict[str, Any]:
    """An ``m.replace`` edit of the bot's message ``event_id`` to ``text``."""
    new = {"msgtype": "m.text", "body": text}
    return {
        "msgtype": "m.text",
        "body": f"* {text}",
        "m.new_content": new,
        "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
    }


def reply_content(event_id: str, text: str, *, thread: str | None = None) -> dict[str, Any]:
    """A notice replying to ``event_id``; inside ``thread`` (its root) when it was in one."""
    relation: dict[str, Any] = {"m.in_reply_to": {"event_id": event_id}}
    if thread is not None:
        relation.update(rel_type="m.thread", event_id=thread, is_falling_back=False)
    return {"msgtype": "m.notice", "body": text, "m.relates_to": relation}


def thread_of(content: dict[str, Any]) -> str | None:
    rel = content.get("m.relates_to")
    if isinstance(rel, dict) and rel.get("rel_type") == "m.thread":
        root = rel.get("event_id")
        return root if isinstance(root, str) else None
    return None


def _strip_reply_fallback(body: str) -> str:
    """A reply's own text, without the ``> <@user> quoted`` lines older clients prepend."""
    lines = body.splitlines()
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    return "\n".join(lines).strip()


def parse_reply(body: str) -> Decision | None:
    """``approve`` / ``deny`` / ``always`` (any case, trailing ``.`` or ``!`` ok) → a decision.

    The whole reply must be the word: "approve, but not that" is no answer.
    """
    return decision_word(_strip_reply_fallback(body))


def replied_to(content: dict[str, Any]) -> str | None:
    """The event an ``m.room.message`` answers: its reply target, or its thread root."""
    rel = content.get("m.relates_to")
    if not isinstance(rel, dict):
        return None
    in_reply = rel.get("m.in_reply_to")
    if isinstance(in_reply, dict) and isinstance(in_reply.get("event_id"), str):
        target: str = in_reply["event_id"]
        # In a thread, a plain message "falls back" to replying to the latest
        # event; the root is what it answers.
        if rel.get("rel_type") == "m.thread" and rel.get("is_falling_back"):
            root = rel.get("event_id")
            return root if isinstance(root, str) else target
        return target
    if rel.get("rel_type") == "m.thread" and isinstance(rel.get("event_id"), str):
        root_id: str = rel["event_id"]
        return root_id
    return None


Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Instance:
    """One pending request as the gateway holds it. A request that reuses an id
    (the sled reconnected, or withdrew the first) is another instance."""

    project: str
    req_id: str
    session: int
    received_at: float
    input_sha256: str

    @classmethod
    def of(cls, item: PendingPermission) -> Instance:
        return cls(
            item.project,
            item.req_id,
            item.session,
            item.received_at,
            item.input_sha256,
        )

    @property
    def key(self) -> Key:
        return (self.project, self.req_id)


@dataclass(slots=True)
class Shown:
    """One of the bot's messages: the instance it shows, and what an answer to it may do."""

    instance: Instance
    clipped: bool = False  # it cut the input: approving needs the console
    answerable: bool = True  # False: a notice without the input (an encrypted room)
    outcome: DecisionRecord | None = None  # set once its instance is settled


class MatrixTransport:
    """A Matrix bot answering one gateway's permission requests in one room.

    ``gateway.add_transport(bot)`` before the gateway starts (it then starts
    and stops with it), or ``start()`` from any thread once the gateway runs
    and ``stop()`` before the gateway stops. ``connected`` (a threading-safe
    snapshot) tells tests and ``/status``-like callers whether the last sync
    succeeded.
    """

    def __init__(
        self, gateway: Gateway, config: MatrixConfig, *, store_dir: str | None = None
    ) -> None:
        self.gateway = gateway
        self.config = config
        self._store_dir = store_dir
        self._queue: asyncio.Queue[tuple[str, Any]] | None = None
        self._future: Any = None
        self._task: asyncio.Task[Any] | None = None
        # The instance pending under each id, kept by the gateway's listeners as
        # it changes (on its loop, like every answer): the one an answer may decide.
        self._current: dict[Key, Instance] = {}
        self._posted: dict[Instance, list[str]] = {}  # pending request → our messages about it
        # Our message → what it showed, kept after the outcome so a late answer
        # hears who was first (bounded: oldest forgotten first).
        self._by_event: OrderedDict[str, Shown] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()  # outsider → last refusal
        self._edits_due: list[tuple[str, str]] = []  # (our message, its outcome line)
        # The room can show our post, and someone answer it, before the homeserver's
        # answer to our send reaches us: answers to an unknown message that come while
        # a send is in flight wait for it (sender, their event, our message, decision, thread).
        self._sending = 0
        self._early: list[tuple[str, str, str, Decision | None, str | None]] = []
        self._live = False  # past the first sync: events are new, act on them
        self._room_id: str | None = None
        self._client: Any = None
        self._connected = False
        self._ever_connected = False
        self.reconnects = 0  # successful syncs after a failed one (tests read it)
        self.posts = 0  # messages posted (tests read it)
        self._scrub = _ScrubFilter([config.password or "", config.access_token or ""])
        # With replicas, only the transport holding the speaker lock posts (see speaker.py).
        self._speaker: SpeakerLock | None = None
        self._speaking = True

    # -- lifecycle (any thread) ---------------------------------------------------

    def _library_loggers(self) -> list[logging.Logger]:
        # A logger's filters see only the records it creates itself, not its
        # children's: filter every logger of those libraries that exists by now.
        import nio  # noqa: F401 - creates nio's loggers

        names = [
            name for name in logging.Logger.manager.loggerDict if name.split(".")[0] in _NIO_LOGGERS
        ]
        return [logging.getLogger(name) for name in sorted({*names, *_NIO_LOGGERS})]

    def start(self) -> MatrixTransport:
        # nio logs whole responses at DEBUG (a login's includes the access
        # token) and every room event at INFO: hold it at WARNING, and scrub.
        for name in _NIO_LOGGERS:
            top = logging.getLogger(name)
            if top.level == logging.NOTSET or top.level < logging.WARNING:
                top.setLevel(logging.WARNING)
        for library_logger in self._library_loggers():
            if (
                library_logger.name.split(".")[0] == "nio"
                and library_logger.level < logging.WARNING
            ):
                library_logger.setLevel(logging.NOTSET)  # inherit nio's WARNING
            library_logger.addFilter(self._scrub)
        replicas = self.gateway.replicas
        url = getattr(replicas.store, "url", None) if replicas is not None else None
        if url is not None and is_postgresql(url):
            self._speaker = SpeakerLock(url)
            self._speaking = False
        self.gateway.add_pending_listener(self._on_pending)
        self.gateway.add_decision_listener(self._on_decision)
        self._future = self.gateway.run_on_loop(self._main())
        access = self.gateway.config.access
        if access is None:
            who = "operators: " + ", ".join(sorted(self.config.operators))
        else:
            mapped = sorted(p.matrix for p in access.people if p.matrix is not None)
            who = "the access file's people: " + (", ".join(mapped) or "none mapped")
            ignored = sorted(self.config.operators - set(mapped))
            if ignored:
                log.warning(
                    "matrix: with --access only the people it maps to Matrix ids answer; "
                    "--matrix-operators {} are not among them and cannot answer",
                    ", ".join(ignored),
                )
        log.info(
            "matrix: bot {} for room {} on {} ({})",
            self.config.user_id,
            self.config.room,
            self.config.homeserver,
            who,
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the bot's task and wait until it closed its HTTP session. Idempotent."""
        future, self._future = self._future, None
        if future is None:
            return
        if self.gateway.running:
            try:
                self.gateway.run_on_loop(self._cancel()).result(timeout)
            except Exception as exc:
                log.warning("matrix: the bot did not stop cleanly: {}", _why(exc))
        future.cancel()
        for library_logger in self._library_loggers():
            library_logger.removeFilter(self._scrub)

    async def _cancel(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def room_id(self) -> str | None:
        return self._room_id

    # -- listeners (the gateway's loop thread) ------------------------------------

    def _on_pending(self, item: PendingPermission) -> None:
        self._current[(item.project, item.req_id)] = Instance.of(item)
        if self._queue is not None:
            self._queue.put_nowait(("post", item))

    def _on_decision(self, record: DecisionRecord) -> None:
        # The gateway settles the instance pending under this id now: it leaves
        # ``_current`` before any answer can see it.
        instance = self._current.pop((record.project, record.req_id), None)
        if self._queue is not None and instance is not None:
            self._queue.put_nowait(("settled", (instance, record)))

    # -- the bot's task -----------------------------------------------------------

    async def _main(self) -> None:
        from nio import AsyncClient, AsyncClientConfig

        self._queue = asyncio.Queue()
        self._task = asyncio.current_task()
        client = AsyncClient(
            self.config.homeserver,
            self.config.user_id,
            store_path=self._store_dir,
            config=AsyncClientConfig(
                # nio would retry a dead homeserver forever inside one call;
                # raise instead, so our loop backs off and keeps the queue moving.
                max_timeouts=0,
                max_limit_exceeded=3,
                request_timeout=REQUEST_TIMEOUT_S,
                store_sync_tokens=False,
                encryption_enabled=False,
            ),
        )
        self._client = client
        worker = asyncio.create_task(self._work())
        following = asyncio.create_task(self._follow_speaker())
        try:
            await self._run(client)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("matrix: the bot crashed; Matrix answers are off until a restart")
        finally:
            worker.cancel()
            following.cancel()
            with contextlib.suppress(BaseException):
                await worker
            with contextlib.suppress(BaseException):
                await following
            if self._speaker is not None:
                self._speaking = False
                await asyncio.to_thread(self._speaker.close)
            self._connected = False
            if self.config.password is not None and client.access_token:
                # Our login made a device and a token: retire both (briefly; the
                # homeserver may be the reason we stop).
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(client.logout(), 2.0)
            with contextlib.suppress(BaseException):
                await client.close()
            log.info("matrix: bot stopped")

    async def _follow_speaker(self) -> None:
        """Take the speaker lock when it is free and notice when it is lost; the speaker
        posts every pending request of the fleet, a standby none."""
        speaker, replicas = self._speaker, self.gateway.replicas
        if speaker is None or replicas is None:
            return
        while True:
            speaking = await speaker.hold()
            if speaking and not self._speaking:
                log.info("matrix: this replica now posts the fleet's requests to the room")
                self._speaking = True
                if self._queue is not None:
                    self._queue.put_nowait(("catch_up", None))
            elif not speaking and self._speaking:
                log.warning("matrix: the speaker lock was lost; another replica posts now")
                self._speaking = False
            await asyncio.sleep(replicas.sweep_interval)

    async def _backoff(self, attempt: int) -> None:
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2**attempt)
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _run(self, client: Any) -> None:
        from nio import (
            JoinError,
            JoinResponse,
            LoginResponse,
            ReactionEvent,
            RoomMessageText,
            SyncResponse,
            WhoamiResponse,
        )

        attempt = 0
        # 1. log in (or check the token); a wrong password is not worth hammering.
        while True:
            try:
                if self.config.password is not None:
                    resp = await client.login(
                        password=self.config.password, device_name=self.config.device_name
                    )
                    if isinstance(resp, LoginResponse):
                        break
                else:
                    client.access_token = self.config.access_token
                    resp = await client.whoami()
                    if isinstance(resp, WhoamiResponse):
                        if resp.user_id != self.config.user_id:
                            log.error(
                                "matrix: the access token belongs to {}, not {}; bot disabled",
                                resp.user_id,
                                self.config.user_id,
                            )
                            return
                        client.user_id = resp.user_id
                        client.device_id = resp.device_id or ""
                        break
                log.warning(
                    "matrix: cannot log in as {}: {}; retrying",
                    self.config.user_id,
                    getattr(resp, "message", resp),
                )
                attempt = min(attempt + 2, 12)  # a refusal: back off faster
            except Exception as exc:
                log.warning("matrix: homeserver unreachable at login ({}); retrying", _why(exc))
                attempt += 1
            await self._backoff(attempt)
        log.info("matrix: logged in as {}", self.config.user_id)

        # 2. join the room (an invitation must be pending, or the room public).
        attempt = 0
        while True:
            try:
                joined = await client.join(self.config.room)
                if isinstance(joined, JoinResponse):
                    self._room_id = joined.room_id
                    break
                assert isinstance(joined, JoinError)
                log.warning(
                    "matrix: cannot join {}: {}; retrying", self.config.room, joined.message
                )
                attempt = min(attempt + 2, 12)
            except Exception as exc:
                log.warning("matrix: homeserver unreachable at join ({}); retrying", _why(exc))
                attempt += 1
            await self._backoff(attempt)
        log.info("matrix: joined {} ({})", self.config.room, self._room_id)

        client.add_event_callback(self._on_message, RoomMessageText)
        client.add_event_callback(self._on_reaction, ReactionEvent)

        # 3. sync: the first one only finds where "now" is (history is not ours
        #    to act on); every later one delivers events to the callbacks.
        attempt = 0
        first = True
        while True:
            try:
                if first:
                    # 1 ms: answer at once; a short timeline is all we need to see.
                    resp = await client.sync(timeout=1, sync_filter=_FIRST_SYNC_FILTER)
                else:
                    # Coming back, do not long-poll: a quiet room would hold
                    # the first successful sync (and the catch-up) for 30 s.
                    poll = SYNC_TIMEOUT_MS if self._connected else 1
                    resp = await client.sync(timeout=poll, since=client.next_batch)
                if not isinstance(resp, SyncResponse):
                    raise _SyncFailed(getattr(resp, "message", str(resp)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._connected or attempt == 0:
                    log.warning("matrix: lost the homeserver ({}); reconnecting", _why(exc))
                self._connected = False
                attempt += 1
                await self._backoff(min(attempt, 12))
                continue
            reconnect = attempt > 0 or first
            attempt = 0
            if first:
                first = False
                self._live = True
                self._check_encryption(client)
            if reconnect:
                self._connected = True
                if self._ever_connected:
                    self.reconnects += 1
                    log.info("matrix: reconnected to the homeserver")
                self._ever_connected = True
                assert self._queue is not None
                self._queue.put_nowait(("catch_up", None))

    def _room_encrypted(self) -> bool:
        """Whether the room has ``m.room.encryption`` as of the last sync (it never goes away)."""
        room = self._client.rooms.get(self._room_id) if self._client is not None else None
        return room is not None and bool(getattr(room, "encrypted", False))

    def _check_encryption(self, client: Any) -> None:
        if self._room_encrypted():
            log.error(
                "matrix: room {} is end-to-end encrypted and the bot cannot encrypt: it posts "
                "no inputs there, only notices pointing to the console (use an unencrypted room)",
                self.config.room,
            )

    # -- posting (one worker: posts and edits keep their order) --------------------

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            kind, obj = await self._queue.get()
            try:
                if kind == "post":
                    instance = Instance.of(obj)
                    # Offline, or already posted by a catch-up: the next catch-up
                    # (on reconnect) posts whatever is still pending.
                    if (
                        self._connected
                        and self._speaking
                        and instance not in self._posted
                        and self._current.get(instance.key) == instance
                    ):
                        await self._post(obj, repost=False)
                elif kind == "settled":
                    await self._settle(*obj)
                elif kind == "catch_up":
                    await self._catch_up()
                elif kind == "send":
                    await self._send(obj)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The sync loop notices a dead homeserver; catch_up re-posts then.
                log.warning("matrix: could not {} ({})", kind, _why(exc))
            await self._answer_early()

    async def _answer_early(self) -> None:
        """Answer what came before our send's result: now to a message we know, or never."""
        early, self._early = self._early, []
        for sender, event_id, target, decision, thread in early:
            if target in self._by_event:
                try:
                    await self._answer(sender, event_id, target, decision, thread)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("matrix: could not handle message {}", event_id)

    async def _send(self, content: dict[str, Any]) -> str:
        from nio import RoomSendResponse

        assert self._room_id is not None
        self._sending += 1
        try:
            resp = await self._client.room_send(
                self._room_id, "m.room.message", content, ignore_unverified_devices=True
            )
        finally:
            self._sending -= 1
        if not isinstance(resp, RoomSendResponse):
            raise _SyncFailed(getattr(resp, "message", str(resp)))
        self.posts += 1
        event_id: str = resp.event_id
        return event_id

    async def _post(self, item: PendingPermission, *, repost: bool) -> None:
        instance = Instance.of(item)
        if self._room_encrypted():
            # Sent in plain text, the input would sit unencrypted in a room its
            # members believe private; and an answer to a notice that did not
            # show it could not be bound to it.
            shown = Shown(instance, answerable=False)
            event_id = await self._send(encrypted_notice(item))
        else:
            content, clipped = _request_message(item, repost=repost)
            shown = Shown(instance, clipped=clipped)
            event_id = await self._send(content)
        # Decisions reach the queue after the request they settle, so this
        # message is registered before its outcome is handled.
        self._posted.setdefault(instance, []).append(event_id)
        self._by_event[event_id] = shown
        while len(self._by_event) > _EVENT_MEMORY:
            self._by_event.popitem(last=False)
        log.info(
            "matrix: posted permission {!r} of sled {!r}{}",
            printable(item.req_id, 120),
            printable(item.project, 120),
            " (a notice: the room is encrypted)" if not shown.answerable else "",
        )

    async def _settle(self, instance: Instance, record: DecisionRecord) -> None:
        text = outcome_text(record)
        for event_id in self._posted.pop(instance, []):
            shown = self._by_event.get(event_id)
            if shown is not None:
                shown.outcome = record
            self._edits_due.append((event_id, text))
        await self._flush_edits()

    async def _flush_edits(self) -> None:
        """Send the outcome edits not yet sent; one that fails waits for the reconnect."""
        while self._edits_due:
            event_id, text = self._edits_due[0]
            await self._send(edit_content(event_id, text))
            self._edits_due.pop(0)

    async def _catch_up(self) -> None:
        """After (re)connecting: post every pending request, again if it was posted before."""
        await self._flush_edits()
        if not self._speaking:
            return  # a standby: the speaker posts them
        items = self.gateway.pending()
        for item in items:  # requests pending from before the bot listened, too
            self._current[(item.project, item.req_id)] = Instance.of(item)
        for item in items:
            instance = Instance.of(item)
            if self._current.get(instance.key) != instance:
                continue  # settled (or replaced) while we were posting the ones before
            await self._post(item, repost=instance in self._posted)

    # -- answers (callbacks run inside client.sync, on the loop) -------------------

    def _ours(self, room: Any, event: Any) -> bool:
        """Is this a new event, in our room, from someone else?"""
        return self._live and room.room_id == self._room_id and event.sender != self.config.user_id

    async def _on_message(self, room: Any, event: Any) -> None:
        try:
            await self._handle_message(room, event)
        except Exception:
            log.exception("matrix: could not handle message {}", event.event_id)

    async def _on_reaction(self, room: Any, event: Any) -> None:
        try:
            await self._handle_reaction(room, event)
        except Exception:
            log.exception("matrix: could not handle reaction {}", event.event_id)

    async def _handle_message(self, room: Any, event: Any) -> None:
        if not self._ours(room, event):
            return
        content = event.source.get("content", {})
        target = replied_to(content) if isinstance(content, dict) else None
        if target is None:
            return
        decision, thread = parse_reply(event.body), thread_of(content)
        if target not in self._by_event:
            self._hold_early(event.sender, event.event_id, target, decision, thread)
            return
        await self._answer(event.sender, event.event_id, target, decision, thread)

    async def _handle_reaction(self, room: Any, event: Any) -> None:
        if not self._ours(room, event):
            return
        target = event.reacts_to
        key = event.key.replace("\ufe0f", "")
        decision = REACTIONS.get(key)
        if decision is None:
            return
        # A refusal answers the reacted-to message (replying to a reaction shows badly).
        if target not in self._by_event:
            self._hold_early(event.sender, target, target, decision, None)
            return
        await self._answer(event.sender, target, target, decision)

    def _hold_early(
        self, sender: str, event_id: str, target: str, decision: Decision | None, thread: str | None
    ) -> None:
        """Keep an answer to a message we do not know while a send of ours is in flight:
        that message may be the one being sent (see ``_early``)."""
        if self._sending and len(self._early) < _EARLY_MEMORY:
            self._early.append((sender, event_id, target, decision, thread))

    async def _answer(
        self,
        sender: str,
        event_id: str,
        target: str,
        decision: Decision | None,
        thread: str | None = None,
    ) -> None:
        shown = self._by_event.get(target)
        if shown is None:
            return
        instance = shown.instance
        principal, why_not = self._voter(sender, instance.project)
        if why_not is not None:  # an outsider hears the refusal, not the hint
            await self._refuse(sender, thread, event_id, why_not)
            return
        if not shown.answerable:
            await self._reply(
                thread, event_id, "Its input is not shown here: answer it in the console."
            )
            return
        if decision is None:
            await self._reply(thread, event_id, "Reply with approve, deny or always.")
            return
        done = shown.outcome
        if done is not None and done.decision != WITHDRAWN:
            await self._reply(
                thread, event_id, f"Too late: already {done.decision} by {printable(done.by)}."
            )
            return
        if self._current.get(instance.key) != instance:
            # Decided or withdrawn, perhaps replaced by a new request under the
            # same id: that one was not shown here, so this answer decides nothing.
            await self._reply(thread, event_id, "That request is no longer pending.")
            return
        if shown.clipped and decision is not Decision.DENY:
            await self._reply(
                thread,
                event_id,
                "This input was too long to show here in full: approve it in the gateway's "
                "console (deny works here).",
            )
            return
        try:
            await self.gateway.decide_on_loop(
                instance.project,
                instance.req_id,
                decision,
                by=principal,
                input_sha256=instance.input_sha256,
            )
        except Forbidden as exc:
            await self._refuse(
                sender, thread, event_id, f"answering needs the {exc.needs.value} role."
            )
        except (VoteCounted, VoteRefused) as exc:
            # A quorum: the vote counted without deciding yet, or cannot count.
            await self._reply(thread, event_id, printable(str(exc)))
        except NotRecorded:
            await self._reply(
                thread,
                event_id,
                "The decision could not be recorded; the request is still pending.",
            )
        except AlreadyDecided as exc:
            record = exc.record
            await self._reply(
                thread, event_id, f"Too late: already {record.decision} by {printable(record.by)}."
            )
        except (UnknownRequest, InputMismatch):
            await self._reply(thread, event_id, "That request is no longer pending.")

    def _voter(self, sender: str, project: str) -> tuple[Principal, str | None]:
        """Whom a Matrix user answers as on ``project``'s request, and why they may not
        (None: they may; the approvals service still judges the vote itself).

        With an ``--access`` file its ``[[person]]`` tables decide: a mapped user is
        that person, with the person's roles, and nobody else answers (the allow
        list then names no one: a user id on it that no person claims would be
        an approver no grant, quorum or audit knows about). Without one, the
        bot's allow list makes a user an approver on every project.
        """
        access = self.gateway.config.access
        if access is None:
            principal = Principal.matrix(sender, approver=sender in self.config.operators)
            if principal.has(Role.APPROVER, project):
                return principal, None
            return principal, "only the gateway's operators can answer."
        person_id = access.person_for_matrix(sender)
        if person_id is None:
            return (
                Principal.matrix(sender, approver=False),
                "not a known person: the gateway's access file maps no person to this "
                "Matrix id, so it cannot answer.",
            )
        principal = access.principal_for(access.person(person_id), Channel.MATRIX)
        if principal.has(Role.APPROVER, project):
            return principal, None
        shown = printable(person_id, 200)
        sled = _shorten(printable(project), 100)
        if principal.has(Role.VIEWER, project):
            return principal, (
                f"{shown} is a viewer of sled '{sled}': answering needs the approver role."
            )
        return principal, (
            f"{shown} has no role on sled '{sled}': answering needs the approver role on it."
        )

    async def _refuse(self, sender: str, thread: str | None, event_id: str, why: str) -> None:
        """Refuse someone who may not answer, in the room at most once per
        ``REFUSAL_INTERVAL_S``: refusals must not become a way to make the bot flood the room."""
        now = time.monotonic()
        last = self._refused.get(sender)
        if last is not None and now - last < REFUSAL_INTERVAL_S:
            log.debug(
                "matrix: {} may not answer; refused (not told again): {}",
                printable(sender, 200),
                why,
            )
            return
        log.warning("matrix: {} may not answer; refused: {}", printable(sender, 200), why)
        self._refused[sender] = now
        self._refused.move_to_end(sender)
        while len(self._refused) > _REFUSED_MEMORY:
            self._refused.popitem(last=False)
        await self._reply(thread, event_id, f"{printable(sender)}: {why}")

    async def _reply(self, thread: str | None, event_id: str, text: str) -> None:
        assert self._queue is not None
        self._queue.put_nowait(("send", reply_content(event_id, text, thread=thread)))


class _SyncFailed(Exception):
    """The homeserver answered with an error instead of a result."""


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
