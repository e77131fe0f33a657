"""Replicas sharing one database: leases, who holds which sled, and pending requests.

- ``replicas``: each gateway replica's lease (``lease_until``), renewed by its sweep.
- ``sleds``: the replica and session holding each project's sled.
- ``pending``: every request from ``perm_request`` to its end, its ``state``
  ``pending`` → ``decided`` → ``delivered``, or ``withdrawn`` / ``undelivered``;
  each change a compare-and-set in the transaction of its audit row.

New tables only: nothing existing is touched.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None

_TIME: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("lease_until", _TIME, nullable=False),
    )
    op.create_table(
        "sleds",
        sa.Column("project", sa.Text(), primary_key=True),
        sa.Column("replica", sa.Text(), nullable=False),
        sa.Column("session", sa.Integer(), nullable=False),
        sa.Column("connected_at", _TIME, nullable=False),
        sa.Column("remote", sa.Text()),
        sa.Column("info", sa.Text()),
        sa.Column("last_seen", _TIME),
    )
    op.create_index("sleds_replica", "sleds", ["replica"])
    op.create_table(
        "pending",
        sa.Column("project", sa.Text(), nullable=False),
        sa.Column("req_id", sa.Text(), nullable=False),
        sa.Column("requested_at", _TIME, nullable=False),
        sa.Column("replica", sa.Text(), nullable=False),
        sa.Column("session", sa.Integer(), nullable=False),
        sa.Column("tool_name", sa.Text(), nullable=False),
        sa.Column("tool_input", sa.Text(), nullable=False),
        sa.Column("needs", sa.Integer(), nullable=False),
        sa.Column("offer", sa.Text()),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("decision", sa.Text()),
        sa.Column("decided_by", sa.Text()),
        sa.Column("decided_at", _TIME),
        sa.PrimaryKeyConstraint("project", "req_id", name="pending_pk"),
    )
    op.create_index("pending_state", "pending", ["state", "replica"])


def downgrade() -> None:
    raise NotImplementedError("the gateway only migrates forward")
