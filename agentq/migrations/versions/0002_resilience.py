"""dead letters; per-run limit overrides, cache opt-out and model attempt records

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("max_turns", sa.Integer))
    op.add_column("runs", sa.Column("max_tokens", sa.Integer))
    op.add_column(
        "runs", sa.Column("use_cache", sa.Boolean, nullable=False, server_default=sa.true())
    )
    op.add_column(
        "runs", sa.Column("model_attempts", sa.Integer, nullable=False, server_default="0")
    )
    op.add_column(
        "runs", sa.Column("fallback_used", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(255)),
        sa.Column("run_id", sa.String(255)),
        sa.Column("reason", sa.String(50), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("payload", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dead_letters_created", "dead_letters", ["created_at"])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_column("runs", "fallback_used")
    op.drop_column("runs", "model_attempts")
    op.drop_column("runs", "use_cache")
    op.drop_column("runs", "max_tokens")
    op.drop_column("runs", "max_turns")
