"""Alembic's entry point: migrate on the connection the store passed in."""

from __future__ import annotations

from alembic import context

from sled_gateway.store.sql import METADATA

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the gateway migrates its store itself when it opens it; "
        "pass a connection in config.attributes['connection']"
    )
# SQLite changes a table's columns by copying it (batch mode); the store's
# SQLite connections run DDL inside their BEGIN, so DDL is transactional.
context.configure(
    connection=connection,
    target_metadata=METADATA,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
