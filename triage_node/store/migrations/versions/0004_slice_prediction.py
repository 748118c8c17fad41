"""Per-slice predictions, computed while a series arrives.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``slice_prediction``."""
    op.create_table(
        "slice_prediction",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_fk", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("neighbours", sa.String(64), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["instance_fk"], ["instance.id"],
                                name=op.f("fk_slice_prediction_instance_fk_instance")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slice_prediction")),
        sa.UniqueConstraint("instance_fk", "model_sha256", "neighbours",
                            name=op.f("uq_slice_prediction_instance_fk")),
    )


def downgrade() -> None:
    """Drop ``slice_prediction``."""
    op.drop_table("slice_prediction")
