"""People: who acted in each audit row, person API tokens, and votes toward a quorum.

- ``audit`` gains ``who`` (a person's id, ``operator``, ``rule:<id>``...) and
  ``channel``; rows written before stay NULL there (their ``decided_by`` says
  what was known). An index on ``(who, id)`` serves ``GET /api/audit?person=``.
- ``person_tokens``: an admin's tokens for people; only the SHA-256 of each
  secret is kept (unique: it is how a bearer token is looked up).
- ``votes``: each person's vote on a request that needs several.

A server database adds the two columns in place. SQLite's ``ADD COLUMN``
would leave ``audit``'s ``CREATE TABLE`` text unlike the one a new database
gets, so there the table is rebuilt as 0003 rebuilt ``rules``: renamed, made
anew as the store declares it, the rows copied with their ids, the old one
dropped. It copies the whole audit once, in the upgrade's transaction.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TIME: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


_OLD_AUDIT = (
    "id, project, session, req_id, tool_name, tool_input, decision, decided_by, "
    "requested_at, decided_at, reason"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.add_column("audit", sa.Column("who", sa.Text()))
        op.add_column("audit", sa.Column("channel", sa.Text()))
    else:
        op.drop_index("audit_decided_at", table_name="audit")
        op.drop_index("audit_project", table_name="audit")
        op.execute("ALTER TABLE audit RENAME TO audit_0003")
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
            sa.Column("who", sa.Text()),
            sa.Column("channel", sa.Text()),
            sqlite_autoincrement=True,
        )
        op.execute(f"INSERT INTO audit ({_OLD_AUDIT}) SELECT {_OLD_AUDIT} FROM audit_0003")
        op.drop_table("audit_0003")
        op.create_index("audit_decided_at", "audit", ["decided_at"])
        op.create_index("audit_project", "audit", ["project", "id"])
    op.create_index("audit_who", "audit", ["who", "id"])
    op.create_table(
        "person_tokens",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("person", sa.Text(), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME),
        sa.Column("revoked_by", sa.Text()),
        sqlite_autoincrement=True,
    )
    op.create_index("person_tokens_secret", "person_tokens", ["secret_sha256"], unique=True)
    op.create_table(
        "votes",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("project", sa.Text(), nullable=False),
        sa.Column("req_id", sa.Text(), nullable=False),
        sa.Column("requested_at", _TIME),
        sa.Column("person", sa.Text(), nullable=False),
        sa.Column("decision", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("needs", sa.Integer(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("votes_request", "votes", ["project", "req_id", "id"])


def downgrade() -> None:
    raise NotImplementedError("the gateway only migrates forward")
