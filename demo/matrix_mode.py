"""The demo's Matrix mode (``bash scripts/demo.sh --matrix``): approve from a chat client.

Before the usual three processes it starts a local Synapse (``demo.synapse``;
installed by ``scripts/install-synapse.sh`` into ``.tools/``) on loopback,
registers a bot and an ``operator`` with fresh random passwords, creates a
private room with both in it, and starts the gateway with the ``--matrix-*``
options. The next steps then say how to log in as the operator with any
Matrix client (Element, web or desktop) and answer by replying ``approve``.
The homeserver stops last, after the gateway.
"""

from __future__ import annotations

import secrets
import socket
from typing import Any

from demo import LOOPBACK, env_port
from demo.run import Demo, say
from demo.synapse import Synapse, SynapseUnavailable, synapse_python

MATRIX_PORT_ENV = "SLED_DEMO_MATRIX_PORT"
DEFAULT_MATRIX_PORT = 8008
BOT, OPERATOR = "sled-bot", "operator"
ROOM_NAME = "sled approvals"


class MatrixDemo(Demo):
    """The demo, plus a homeserver and the gateway's Matrix bot."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.matrix_port = env_port(MATRIX_PORT_ENV, DEFAULT_MATRIX_PORT)
        self.synapse: Synapse | None = None
        self.operator_password = secrets.token_urlsafe(9)
        self.bot_password = secrets.token_urlsafe(18)
        self.room_id = ""

    @property
    def bot_id(self) -> str:
        return f"@{BOT}:localhost"

    @property
    def operator_id(self) -> str:
        return f"@{OPERATOR}:localhost"

    def check_ports(self) -> str | None:
        if self.matrix_port in (self.gateway_port, self.mcp_port, self.uplink_port):
            return f"the Matrix port {self.matrix_port} must differ from the other three"
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, self.matrix_port))
            except OSError as exc:
                return (
                    f"port {self.matrix_port} (Matrix homeserver) is already in use: "
                    f"{exc.strerror or exc}.\n  Pick another: {MATRIX_PORT_ENV}=<port>"
                )
        return super().check_ports()

    def start_homeserver(self) -> bool:
        python = synapse_python()
        if python is None:
            say("demo: Synapse is not installed; run: bash scripts/install-synapse.sh")
            return False
        where = f"{LOOPBACK}:{self.matrix_port}"
        say(f"demo: starting a local Matrix homeserver (Synapse) on {where} ...")
        synapse = Synapse(self.log_dir / "synapse", python)
        synapse.port = self.matrix_port
        self.synapse = synapse
        try:
            synapse.start(timeout=self.args.ready_timeout)
            synapse.register(BOT, self.bot_password)
            synapse.register(OPERATOR, self.operator_password)
            token = synapse.login(self.operator_id, self.operator_password)
            self.room_id = synapse.create_room(token, ROOM_NAME, invite=[self.bot_id])
        except (SynapseUnavailable, OSError) as exc:
            say(f"demo: the homeserver did not start: {exc}")
            say(f"  its log: {synapse.log_path}")
            return False
        except Exception as exc:  # httpx errors while setting up users and the room
            say(f"demo: setting up the homeserver failed: {exc!r}")
            return False
        password_file = self.log_dir / "matrix-bot-password"
        password_file.write_text(self.bot_password + "\n")
        password_file.chmod(0o600)
        return True

    def build_children(self) -> None:
        super().build_children()
        assert self.synapse is not None
        self.child("gateway").argv += [
            "--matrix-homeserver",
            self.synapse.url,
            "--matrix-user",
            self.bot_id,
            "--matrix-password-file",
            str(self.log_dir / "matrix-bot-password"),
            "--matrix-room",
            self.room_id,
            "--matrix-operators",
            self.operator_id,
        ]

    def start(self) -> bool:
        return self.start_homeserver() and super().start()

    def next_steps(self) -> str:
        assert self.synapse is not None
        return (
            super().next_steps()
            + f"""
  Approve from Matrix: log in with any Matrix client, e.g. Element
  (https://app.element.io or the desktop app):

      homeserver  {self.synapse.url}
      user        {OPERATOR}   (full id {self.operator_id})
      password    {self.operator_password}

  Open the room "{ROOM_NAME}" (room id {self.room_id}). The bot posts
  each permission request there: reply to its message with approve, deny or
  always (or react with ✅ / ❌ / 🔁). The homeserver's log: {self.synapse.log_path}
"""
        )

    def stop(self) -> bool:
        clean = super().stop()
        if self.synapse is not None:
            self.synapse.stop()
            say("demo: the Matrix homeserver stopped")
        return clean
