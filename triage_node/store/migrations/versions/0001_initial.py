"""Initial schema: patient, study, series, instance, event.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Hand-written to match ``triage_node.store.models`` exactly (constraint and index names follow
``models.NAMING_CONVENTION``); ``tests/test_store.py`` compares the two on SQLite and
PostgreSQL. Datetimes are ``DateTime(timezone=True)``: ``timestamptz`` on PostgreSQL, naive
UTC text on SQLite (``models.UTCDateTime`` converts).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UID = sa.String(128)
STATE = sa.String(32)


def _utc() -> sa.DateTime:
    """A timezone-aware datetime column type."""
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the five tables and their indexes."""
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("patient_name", sa.String(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patient"),
        sa.UniqueConstraint("patient_id", name="uq_patient_patient_id"),
    )
    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("patient_fk", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(), nullable=False),
        sa.Column("study_date", sa.String(), nullable=False),
        sa.Column("study_description", sa.String(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_study"),
        sa.UniqueConstraint("study_instance_uid", name="uq_study_study_instance_uid"),
        sa.ForeignKeyConstraint(["patient_fk"], ["patient.id"], name="fk_study_patient_fk_patient"),
    )
    op.create_index("ix_study_patient_fk", "study", ["patient_fk"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(), nullable=False),
        sa.Column("body_part_examined", sa.String(), nullable=False),
        sa.Column("series_description", sa.String(), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("state", STATE, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("first_received_at", _utc(), nullable=True),
        sa.Column("last_received_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
        sa.ForeignKeyConstraint(["study_fk"], ["study.id"], name="fk_series_study_fk_study"),
    )
    op.create_index("ix_series_study_fk", "series", ["study_fk"])
    op.create_index("ix_series_state_last_received_at", "series", ["state", "last_received_at"])
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("transfer_syntax_uid", UID, nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("image_type", sa.String(), nullable=False),
        sa.Column("image_position", sa.String(), nullable=True),
        sa.Column("image_orientation", sa.String(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("file_path", sa.String(), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("calling_ae", sa.String(), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_instance"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instance_sop_instance_uid"),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"], name="fk_instance_series_fk_series"),
    )
    op.create_index("ix_instance_series_fk", "instance", ["series_fk"])
    op.create_table(
        "event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("kind", STATE, nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("peer", sa.String(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("study_instance_uid", UID, nullable=True),
        sa.Column("series_instance_uid", UID, nullable=True),
        sa.Column("sop_instance_uid", UID, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_event"),
    )
    op.create_index("ix_event_at", "event", ["at"])


def downgrade() -> None:
    """Drop everything :func:`upgrade` created."""
    op.drop_index("ix_event_at", table_name="event")
    op.drop_table("event")
    op.drop_index("ix_instance_series_fk", table_name="instance")
    op.drop_table("instance")
    op.drop_index("ix_series_state_last_received_at", table_name="series")
    op.drop_index("ix_series_study_fk", table_name="series")
    op.drop_table("series")
    op.drop_index("ix_study_patient_fk", table_name="study")
    op.drop_table("study")
    op.drop_table("patient")
