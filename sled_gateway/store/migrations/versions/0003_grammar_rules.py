"""Rules in Claude Code's grammar: a ``rule`` text column, and ``ask`` as an action.

A row with ``rule`` NULL is an exact rule of the earlier kind (tool, key),
matched as before; a row with ``rule`` is one rule in the grammar of
``protocol.rules`` and its ``match_key`` is NULL. ``action`` may now be
``ask`` as well as ``allow`` and ``deny``.

SQLite cannot change a CHECK constraint in place. The rules table is small
(people make rules), so it is rebuilt here: the old table is renamed, the new
one created exactly as the store declares it (the same ``CREATE TABLE`` text
a new database gets), the rows copied with their ids, the old table dropped.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TIME: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
_OLD_COLUMNS = (
    "id, project, tool_name, match_key, action, created_at, created_by, origin, reason, "
    "revoked_at, revoked_by"
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.add_column("rules", sa.Column("rule", sa.Text()))
        op.drop_constraint("rules_action", "rules", type_="check")
        op.create_check_constraint("rules_action", "rules", "action IN ('allow', 'ask', 'deny')")
        return
    op.drop_index("rules_revoked_at", table_name="rules")
    op.execute("ALTER TABLE rules RENAME TO rules_0002")
    op.create_table(
        "rules",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("project", sa.Text()),
        sa.Column("tool_name", sa.Text(), nullable=False),
        sa.Column("match_key", sa.Text()),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text()),
        sa.Column("reason", sa.Text()),
        sa.Column("revoked_at", _TIME),
        sa.Column("revoked_by", sa.Text()),
        sa.Column("rule", sa.Text()),
        sa.CheckConstraint("action IN ('allow', 'ask', 'deny')", name="rules_action"),
        sqlite_autoincrement=True,
    )
    op.execute(f"INSERT INTO rules ({_OLD_COLUMNS}) SELECT {_OLD_COLUMNS} FROM rules_0002")
    op.drop_table("rules_0002")
    op.create_index("rules_revoked_at", "rules", ["revoked_at"])


def downgrade() -> None:
    raise NotImplementedError("the gateway only migrates forward")
