"""One result document per stored result and SOP class (the SR and the key-image SC).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 16:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Unique (series, result, SOP class) instead of (series, result)."""
    with op.batch_alter_table("result_document") as batch:
        batch.drop_constraint("uq_result_document_series_fk", type_="unique")
        batch.create_unique_constraint(
            "uq_result_document_series_fk", ["series_fk", "result_stored_at", "sop_class_uid"])


def downgrade() -> None:
    """Back to one document per result (fails if a result has an SR and an SC)."""
    with op.batch_alter_table("result_document") as batch:
        batch.drop_constraint("uq_result_document_series_fk", type_="unique")
        batch.create_unique_constraint(
            "uq_result_document_series_fk", ["series_fk", "result_stored_at"])
