"""A loopback stand-in for the Anthropic Messages API that replays a script.

The language model is the one part of a Claude Code run a test cannot have
for real, so this server plays it: Claude Code (``ANTHROPIC_BASE_URL`` pointed
here, a dummy ``ANTHROPIC_API_KEY``) POSTs ``/v1/messages`` and gets the next
scripted turn. A turn is a list of tool uses (``("Bash", {"command": ...})``)
or a final text. The turn to play is the number of assistant messages already
in the conversation, so a retry of the same request gets the same turn, and
side requests Claude Code makes without tools (titles, summaries) get a short
text and do not advance the script.

Answers come as the Messages API's SSE stream when the request says
``"stream": true`` (Claude Code's does), else as one JSON message. Every
response has a unique message id and every tool use a unique ``toolu_`` id.
``HEAD /`` answers 200 (Claude Code probes it). Every request is recorded, so
a test can assert what the model was shown (e.g. a deny message in a
``tool_result``).
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

ToolUse = tuple[str, dict[str, Any]]
Turn = list[ToolUse] | str

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}{next(_ids):04d}"


@dataclass
class FakeAnthropic:
    """``with FakeAnthropic([...turns...]) as model:`` → ``model.base_url``."""

    script: list[Turn]
    requests: list[dict[str, Any]] = field(default_factory=list)
    tool_use_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:  # keep pytest's output clean
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self._json(200, {})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    self._json(400, {"type": "error", "error": {"message": "bad JSON"}})
                    return
                path = self.path.split("?", 1)[0]
                if path.endswith("/count_tokens"):
                    self._json(200, {"input_tokens": 10})
                    return
                if not path.endswith("/v1/messages"):
                    self._json(404, {"type": "error", "error": {"message": path}})
                    return
                blocks, stop = model._answer(body)
                message = {
                    "id": _new_id("msg"),
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model", "claude-test"),
                    "content": blocks,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": 5},
                }
                if body.get("stream"):
                    self._stream(message)
                else:
                    self._json(200, message)

            def _json(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, message: dict[str, Any]) -> None:
                events: list[tuple[str, dict[str, Any]]] = [
                    (
                        "message_start",
                        {
                            "type": "message_start",
                            "message": {
                                **message,
                                "content": [],
                                "stop_reason": None,
                                "usage": {"input_tokens": 10, "output_tokens": 1},
                            },
                        },
                    )
                ]
                for index, block in enumerate(message["content"]):
                    if block["type"] == "text":
                        start = {"type": "text", "text": ""}
                        delta = {"type": "text_delta", "text": block["text"]}
                    else:
                        start = {**block, "input": {}}
                        delta = {
                            "type": "input_json_delta",
                            "partial_json": json.dumps(block["input"]),
                        }
                    events += [
                        (
                            "content_block_start",
                            {"type": "content_block_start", "index": index, "content_block": start},
                        ),
                        (
                            "content_block_delta",
                            {"type": "content_block_delta", "index": index, "delta": delta},
                        ),
                        ("content_block_stop", {"type": "content_block_stop", "index": index}),
                    ]
                events += [
                    (
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                            "usage": {"output_tokens": 5},
                        },
                    ),
                    ("message_stop", {"type": "message_stop"}),
                ]
                data = "".join(
                    f"event: {name}\ndata: {json.dumps(payload)}\n\n" for name, payload in events
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-anthropic", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- the script --------------------------------------------------------------

    def _answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        with self._lock:
            self.requests.append(body)
            if not body.get("tools"):  # a side request (title, summary): not the agent
                return [{"type": "text", "text": "ok"}], "end_turn"
            turn_index = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
            turn: Turn = self.script[turn_index] if turn_index < len(self.script) else "Done."
            if isinstance(turn, str):
                return [{"type": "text", "text": turn}], "end_turn"
            blocks = []
            for name, tool_input in turn:
                tool_use_id = _new_id("toolu")
                self.tool_use_ids.append(tool_use_id)
                blocks.append(
                    {"type": "tool_use", "id": tool_use_id, "name": name, "input": tool_input}
                )
            return blocks, "tool_use"

    # -- what the model saw ------------------------------------------------------

    def agent_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r.get("tools")]

    def tool_results(self) -> list[dict[str, Any]]:
        """Every distinct ``tool_result`` block the agent sent back, in order."""
        seen: dict[str, dict[str, Any]] = {}
        for request in self.agent_requests():
            for message in request.get("messages", []):
                content = message.get("content")
                if message.get("role") != "user" or not isinstance(content, list):
                    continue
                for block in content:
                    if isinstance(block, dict) and block.get("type") == "tool_result":
                        seen.setdefault(block["tool_use_id"], block)
        return list(seen.values())


def result_text(block: dict[str, Any]) -> str:
    """A ``tool_result``'s content as one string (it may be a string or text blocks)."""
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
