"""A real Synapse homeserver on loopback, for the demo's Matrix mode and the tests.

Synapse comes from ``scripts/install-synapse.sh`` (a pinned ``matrix-synapse``
in ``.tools/synapse-venv``, apart from the project's venv). :class:`Synapse`
writes a minimal ``homeserver.yaml`` (server name ``localhost``, one client
listener on 127.0.0.1, no federation, rate limits raised so tests are not
throttled), generates the signing key, starts the server and waits for
``/health``. Users are registered through the shared-secret admin API, the
way ``register_new_matrix_user`` does it.

Synapse cannot be told to listen on port 0, so a free port is found by
binding and releasing one; if another process takes it first, start retries
with a new port. A restart keeps the port (clients are configured with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SYNAPSE_PYTHON_ENV = "SLED_SYNAPSE_PYTHON"
SERVER_NAME = "localhost"

_RATE = "{per_second: 10000, burst_count: 10000}"
_CONFIG = """\
server_name: "{server_name}"
pid_file: "{dir}/homeserver.pid"
public_baseurl: "http://127.0.0.1:{port}/"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{dir}/homeserver.db"
log_config: "{dir}/log.config"
media_store_path: "{dir}/media_store"
signing_key_path: "{dir}/localhost.signing.key"
registration_shared_secret: "{secret}"
macaroon_secret_key: "{macaroon}"
form_secret: "{form}"
enable_registration: false
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
presence:
  enabled: false
url_preview_enabled: false
enable_metrics: false
rc_message: {rate}
rc_registration: {rate}
rc_login:
  address: {rate}
  account: {rate}
  failed_attempts: {rate}
rc_joins:
  local: {rate}
  remote: {rate}
rc_joins_per_room: {rate}
rc_invites:
  per_room: {rate}
  per_user: {rate}
  per_issuer: {rate}
rc_admin_redaction: {rate}
rc_3pid_validation: {rate}
rc_room_creation: {rate}
"""
_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: "%(asctime)s %(name)s %(levelname)s %(request)s %(message)s"
handlers:
  file:
    class: logging.FileHandler
    filename: "{dir}/homeserver.log"
    formatter: precise
    filters: [context]
filters:
  context:
    (): synapse.logging.context.LoggingContextFilter
    request: ""
loggers:
  synapse.storage.SQL:
    level: WARNING
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""


class SynapseUnavailable(RuntimeError):
    """Synapse is not installed or would not start (the reason is the message)."""


def synapse_python() -> Path | None:
    """The interpreter of Synapse's venv, if Synapse is installed there."""
    override = os.environ.get(SYNAPSE_PYTHON_ENV)
    path = Path(override) if override else ROOT / ".tools" / "synapse-venv" / "bin" / "python"
    if not path.exists():
        return None
    probe = subprocess.run(
        [str(path), "-c", "import synapse.app.homeserver"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return path if probe.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Synapse:
    """One Synapse process in ``base_dir`` (config, SQLite, logs all there)."""

    def __init__(self, base_dir: Path, python: Path) -> None:
        self.dir = base_dir
        self.python = python
        self.port = 0
        self.shared_secret = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        return self.dir / "homeserver.log"

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "media_store").mkdir(exist_ok=True)
        self.config_path.write_text(
            _CONFIG.format(
                server_name=SERVER_NAME,
                dir=self.dir,
                port=self.port,
                secret=self.shared_secret,
                macaroon=secrets.token_hex(16),
                form=secrets.token_hex(16),
                rate=_RATE,
            )
        )
        (self.dir / "log.config").write_text(_LOG_CONFIG.format(dir=self.dir))
        if not (self.dir / "localhost.signing.key").exists():
            gen = subprocess.run(
                [
                    str(self.python),
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    str(self.config_path),
                    "--generate-keys",
                ],
                cwd=self.dir,
                capture_output=True,
                timeout=120,
                check=False,
            )
            if gen.returncode != 0:
                raise SynapseUnavailable(
                    "synapse --generate-keys failed: " + gen.stderr.decode(errors="replace")[-500:]
                )

    def start(self, timeout: float = 120.0, attempts: int = 3) -> Synapse:
        """Start (a first start picks the port); return once ``/health`` answers."""
        keep_port = self.port != 0
        for attempt in range(attempts):
            if not keep_port:
                self.port = free_port()
            self._write_config()
            self._spawn()
            try:
                self._wait_healthy(timeout)
            except SynapseUnavailable:
                self.stop()
                in_use = "Address already in use" in self._log_tail()
                if keep_port or not in_use or attempt == attempts - 1:
                    raise
            else:
                return self
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        out = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log_file = out
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _log_tail(self) -> str:
        text = ""
        for name in ("stdout.log", "homeserver.log"):
            with contextlib.suppress(OSError):
                text += (self.dir / name).read_text("utf-8", "replace")[-3000:]
        return text

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SynapseUnavailable(
                    f"synapse exited with {self.proc.returncode}: {self._log_tail()[-800:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).text == "OK":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SynapseUnavailable(f"synapse not healthy within {timeout} s: {self._log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def restart(self, timeout: float = 120.0) -> None:
        self.stop()
        self.start(timeout)

    # -- users --------------------------------------------------------------------

    def register(self, localpart: str, password: str, *, admin: bool = False) -> str:
        """Register ``@localpart:localhost`` with the shared secret; return the user id."""
        endpoint = f"{self.url}/_synapse/admin/v1/register"
        nonce = httpx.get(endpoint, timeout=30).json()["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, localpart, password):
            mac.update(part.encode())
            mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        resp = httpx.post(
            endpoint,
            json={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
            timeout=30,
        )
        resp.raise_for_status()
        user_id: str = resp.json()["user_id"]
        return user_id

    def login(self, user_id: str, password: str) -> str:
        """A fresh access token for ``user_id`` (a new device)."""
        resp = httpx.post(
            f"{self.url}/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user_id},
                "password": password,
            },
            timeout=30,
        )
        resp.raise_for_status()
        token: str = resp.json()["access_token"]
        return token

    def create_room(self, token: str, name: str, invite: list[str]) -> str:
        """A private, unencrypted room created by the token's user; its room id."""
        resp = httpx.post(
            f"{self.url}/_matrix/client/v3/createRoom",
            headers={"Authorization": f"Bearer {token}"},
            json={"name": name, "preset": "private_chat", "invite": invite},
            timeout=30,
        )
        resp.raise_for_status()
        room_id: str = resp.json()["room_id"]
        return room_id
