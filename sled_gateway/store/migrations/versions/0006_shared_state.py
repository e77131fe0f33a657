"""What replicas share besides the audit and the rules: console sessions, logins in
flight, and the gateway's own settings.

- ``console_sessions``: one row per console session, keyed by the SHA-256 (hex)
  of its id (the cookie's value never reaches the database); the person it
  remembers as JSON (NULL: opened with the operator token), their id for the
  per-person bound, and wall-clock creation and expiry (replicas share no
  monotonic clock).
- ``oidc_logins``: the OpenID Connect logins in flight (Authlib's state cache),
  single-use, so that a login started on one replica ends on another.
- ``settings``: named values made once per database, such as the key that signs
  the sign-in flow's state cookie.

Revision ID: 0006
Revises: 0004 (the integrator re-chains it after 0005)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None

_TIME: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id_sha256", sa.String(64), primary_key=True),
        sa.Column("person_id", sa.Text()),
        sa.Column("person", sa.Text()),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
    )
    op.create_index("console_sessions_person", "console_sessions", ["person_id", "created_at"])
    op.create_index("console_sessions_created_at", "console_sessions", ["created_at"])
    op.create_index("console_sessions_expires_at", "console_sessions", ["expires_at"])
    op.create_table(
        "oidc_logins",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
    )
    op.create_index("oidc_logins_created_at", "oidc_logins", ["created_at"])
    op.create_table(
        "settings",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the gateway only migrates forward")
