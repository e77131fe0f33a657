"""The store's schema history as Alembic revisions, run by the gateway itself at open.

No ``alembic.ini`` is involved: :func:`upgrade` builds the configuration in
code, pointing at this folder, and hands Alembic the store's own connection
(``config.attributes["connection"]``), inside the store's transaction, so a
failed migration leaves the file as it was.

Each revision's id is the schema version it produces, four digits
(``0002``, ``0003``, ...), continuing the numbers 0.1 and 0.2 wrote into
SQLite's ``PRAGMA user_version``. ``0002`` is the 0.2.0 schema: it creates it
in an empty database and completes a file from 0.1.0 or 0.2.0 (which have no
Alembic table) by looking at what is there.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

HERE = Path(__file__).resolve().parent


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this folder (and, to migrate, a connection)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(config()).walk_revisions()}


def head() -> str:
    found = ScriptDirectory.from_config(config()).get_current_head()
    assert found is not None
    return found


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision, in the connection's open transaction."""
    command.upgrade(config(connection), "head")
