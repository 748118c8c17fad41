"""Result documents (the SR) and the outbox of their deliveries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 16:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``result_document`` and ``outbox``."""
    op.create_table(
        "result_document",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(128), nullable=False),
        sa.Column("sop_class_uid", sa.String(128), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=False),
        sa.Column("result_stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("supersedes_sop_instance_uid", sa.String(128), nullable=True),
        sa.Column("dataset", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"],
                                name=op.f("fk_result_document_series_fk_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_document")),
        sa.UniqueConstraint("series_fk", "result_stored_at",
                            name=op.f("uq_result_document_series_fk")),
        sa.UniqueConstraint("sop_instance_uid",
                            name=op.f("uq_result_document_sop_instance_uid")),
    )
    op.create_index(op.f("ix_result_document_series_fk"), "result_document", ["series_fk"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document_fk", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["document_fk"], ["result_document.id"],
                                name=op.f("fk_outbox_document_fk_result_document")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("document_fk", "destination", name=op.f("uq_outbox_document_fk")),
    )
    op.create_index("ix_outbox_state_next_attempt_at", "outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    """Drop ``outbox`` and ``result_document``."""
    op.drop_index("ix_outbox_state_next_attempt_at", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index(op.f("ix_result_document_series_fk"), table_name="result_document")
    op.drop_table("result_document")
