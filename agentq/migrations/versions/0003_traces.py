"""traces and spans of agent runs, recorded by the worker's trace processor

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "traces",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(32)),
        sa.Column("attempt", sa.Integer),
        sa.Column("workflow_name", sa.String(255)),
        sa.Column("group_id", sa.String(255)),
        sa.Column("metadata", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_traces_run_id", "traces", ["run_id"])
    op.create_table(
        "spans",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("trace_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(32)),
        sa.Column("parent_id", sa.String(64)),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("name", sa.String(255)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("duration_ms", sa.Float),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("data", sa.Text),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_spans_trace_id", "spans", ["trace_id"])
    op.create_index("ix_spans_run_id", "spans", ["run_id"])


def downgrade() -> None:
    op.drop_table("spans")
    op.drop_table("traces")
