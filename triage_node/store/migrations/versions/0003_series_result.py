"""Series results of the classifier.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 15:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``series_result``."""
    op.create_table(
        "series_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("slices", sa.JSON(), nullable=False),
        sa.Column("key_sop_instance_uid", sa.String(128), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("inference_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("inference_done_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"],
                                name=op.f("fk_series_result_series_fk_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series_result")),
        sa.UniqueConstraint("series_fk", name=op.f("uq_series_result_series_fk")),
    )


def downgrade() -> None:
    """Drop ``series_result``."""
    op.drop_table("series_result")
