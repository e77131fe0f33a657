"""The store's schema history as Alembic revisions, run by the gateway itself at open.

No ``alembic.ini`` is involved: :func:`upgrade` builds the configuration in
code, pointing at this folder, and hands Alembic the store's own connection
(``config.attributes["connection"]``), inside the store's transaction, so a
failed migration leaves the database as it was.

Each revision's id is the schema version it produces, four digits
(``0002``, ``0003``, ...), continuing the numbers 0.1 and 0.2 wrote into
SQLite's ``PRAGMA user_version``. ``0002`` is the 0.2.0 schema: it creates it
in an empty database and completes a file from 0.1.0 or 0.2.0 (which have no
Alembic table) by looking at what is there.

Alembic is imported only here, and only when a database needs migrating or
a test asks about the revisions, so an ordinary start does not load it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy import Connection

HERE = Path(__file__).resolve().parent


@contextmanager
def _alembic_quiet() -> Iterator[None]:
    # Alembic narrates its plugins and each step at INFO; the store logs the
    # outcome in one line of its own, so only Alembic's warnings get through.
    narrator = logging.getLogger("alembic")
    level = narrator.level
    narrator.setLevel(logging.WARNING)
    try:
        yield
    finally:
        narrator.setLevel(level)


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this folder (and, to migrate, a connection)."""
    with _alembic_quiet():
        from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def scripts() -> ScriptDirectory:
    with _alembic_quiet():
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(config())


def known_revisions() -> set[str]:
    return {script.revision for script in scripts().walk_revisions()}


def head() -> str:
    found = scripts().get_current_head()
    assert found is not None
    return found


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision, in the connection's open transaction."""
    with _alembic_quiet():
        from alembic import command

        command.upgrade(config(connection), "head")
