"""The 0.2.0 schema: the audit log (with a reason on each row) and the rules.

A database from before Alembic is completed, not recreated: 0.1.0 made the
audit table without ``reason`` and no rules table (its ``user_version`` 1);
0.2.0 made both (``user_version`` 2), so nothing is left to do for it.

Revision ID: 0002
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = None
branch_labels = None
depends_on = None

# Audit ids are 64-bit where the engine has a choice; SQLite's rowid is already.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Unix seconds, as 8-byte floats everywhere (SQLite's REAL is one).
_TIME: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("audit"):
        op.create_table(
            "audit",
            sa.Column("id", _ID, primary_key=True, autoincrement=True),
            sa.Column("project", sa.Text(), nullable=False),
            sa.Column("session", sa.Integer()),
            sa.Column("req_id", sa.Text(), nullable=False),
            sa.Column("tool_name", sa.Text(), nullable=False),
            sa.Column("tool_input", sa.Text(), nullable=False),
            sa.Column("decision", sa.Text(), nullable=False),
            sa.Column("decided_by", sa.Text(), nullable=False),
            sa.Column("requested_at", _TIME),
            sa.Column("decided_at", _TIME, nullable=False),
            sa.Column("reason", sa.Text()),
            sqlite_autoincrement=True,
        )
        op.create_index("audit_decided_at", "audit", ["decided_at"])
        op.create_index("audit_project", "audit", ["project", "id"])
    elif "reason" not in {column["name"] for column in inspector.get_columns("audit")}:
        op.add_column("audit", sa.Column("reason", sa.Text()))
    if not inspector.has_table("rules"):
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
            sa.CheckConstraint("action IN ('allow', 'deny')", name="rules_action"),
            sqlite_autoincrement=True,
        )
        op.create_index("rules_revoked_at", "rules", ["revoked_at"])


def downgrade() -> None:
    raise NotImplementedError("0002 is the first schema; there is nothing older to go back to")
