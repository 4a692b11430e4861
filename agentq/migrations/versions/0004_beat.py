"""health checks, health state and transitions, metric rollups, scheduled batches, beat slots

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "health_checks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("check", sa.String(50), nullable=False),
        sa.Column("healthy", sa.Boolean, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("worker", sa.String(255)),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_health_checks_check_at", "health_checks", ["check", "checked_at"])
    op.create_index("ix_health_checks_checked_at", "health_checks", ["checked_at"])
    op.create_table(
        "health_state",
        sa.Column("name", sa.String(50), primary_key=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("failing", sa.Text),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "health_transitions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("previous", sa.String(20), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("failing", sa.Text),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_health_transitions_at", "health_transitions", ["at"])
    op.create_table(
        "metric_rollups",
        sa.Column("agent", sa.String(100), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("runs", sa.Integer, nullable=False),
        sa.Column("succeeded", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("cancelled", sa.Integer, nullable=False),
        sa.Column("p50_ms", sa.Float),
        sa.Column("p95_ms", sa.Float),
        sa.Column("p99_ms", sa.Float),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("total_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached", sa.Integer, nullable=False),
        sa.Column("cache_hit_rate", sa.Float, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_metric_rollups_minute", "metric_rollups", ["minute"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("schedule", sa.String(100), nullable=False),
        sa.Column("slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent", sa.String(100), nullable=False),
        sa.Column("priority", sa.String(10), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("schedule", "slot", name="uq_batches_schedule_slot"),
    )
    op.create_index("ix_batches_created_at", "batches", ["created_at"])
    op.create_index("ix_runs_batch_id", "runs", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_batch_id", table_name="runs")
    op.drop_table("batches")
    op.drop_table("metric_rollups")
    op.drop_table("health_transitions")
    op.drop_table("health_state")
    op.drop_table("health_checks")
