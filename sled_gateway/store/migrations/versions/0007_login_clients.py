"""Who started each sign-in in flight, so that one client's share of them is counted
over every replica on the database, not per replica.

- ``oidc_logins.client``: the client that started the login (its address, an IPv6
  one by its /64), NULL for logins kept before this revision; indexed with the
  expiry, since a start counts that client's unexpired logins.

A server database adds the column in place. SQLite's ``ADD COLUMN`` would leave
the table's ``CREATE TABLE`` text unlike the one a new database gets, so there the
table is rebuilt as 0004 rebuilt ``audit``: renamed, made anew as the store
declares it, the rows copied, the old one dropped. It holds ten minutes of
sign-ins at most.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None

_TIME: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
_OLD_LOGINS = "key, value, created_at, expires_at"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.add_column("oidc_logins", sa.Column("client", sa.String(64)))
    else:
        op.drop_index("oidc_logins_created_at", table_name="oidc_logins")
        op.execute("ALTER TABLE oidc_logins RENAME TO oidc_logins_0006")
        op.create_table(
            "oidc_logins",
            sa.Column("key", sa.String(200), primary_key=True),
            sa.Column("value", sa.Text(), nullable=False),
            sa.Column("created_at", _TIME, nullable=False),
            sa.Column("expires_at", _TIME, nullable=False),
            sa.Column("client", sa.String(64)),
        )
        op.execute(
            f"INSERT INTO oidc_logins ({_OLD_LOGINS}) SELECT {_OLD_LOGINS} FROM oidc_logins_0006"
        )
        op.drop_table("oidc_logins_0006")
        op.create_index("oidc_logins_created_at", "oidc_logins", ["created_at"])
    op.create_index("oidc_logins_client", "oidc_logins", ["client", "expires_at"])


def downgrade() -> None:
    raise NotImplementedError("the gateway only migrates forward")
