"""Radiologist worklist: feedback, key images, worker heartbeats.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``feedback``, ``key_image`` and ``worker_heartbeat``."""
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(), nullable=False),
        sa.Column("ich", sa.Boolean(), nullable=False),
        sa.Column("subtypes", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("result_stored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"],
                                name=op.f("fk_feedback_series_fk_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_series_fk"), "feedback", ["series_fk"])
    op.create_table(
        "key_image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(128), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("plain_png", sa.LargeBinary(), nullable=False),
        sa.Column("heatmap_png", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"],
                                name=op.f("fk_key_image_series_fk_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_image")),
        sa.UniqueConstraint("series_fk", name=op.f("uq_key_image_series_fk")),
    )
    op.create_table(
        "worker_heartbeat",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_heartbeat")),
        sa.UniqueConstraint("name", name=op.f("uq_worker_heartbeat_name")),
    )


def downgrade() -> None:
    """Drop ``worker_heartbeat``, ``key_image`` and ``feedback``."""
    op.drop_table("worker_heartbeat")
    op.drop_table("key_image")
    op.drop_index(op.f("ix_feedback_series_fk"), table_name="feedback")
    op.drop_table("feedback")
