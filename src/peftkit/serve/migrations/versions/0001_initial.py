"""The first schema: api_keys, files, jobs, events, checkpoints.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger),
    )
    op.create_table(
        "files",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("owner", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("owner", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("validation_file", sa.String(40)),
        sa.Column("suffix", sa.String(64)),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("meta", sa.JSON),
        sa.Column("method", sa.JSON, nullable=False),
        sa.Column("peftkit", sa.JSON, nullable=False),
        sa.Column("status", sa.String(24), nullable=False, index=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger),
        sa.Column("error", sa.JSON),
        sa.Column("fine_tuned_model", sa.String(400)),
        sa.Column("model_deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("trained_tokens", sa.BigInteger),
        sa.Column("total_steps", sa.Integer),
        sa.Column("worker", sa.String(80)),
        sa.Column("heartbeat_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON),
        sa.Column("step", sa.Integer),
    )
    op.create_index("ix_events_job_step", "events", ["job_id", "type", "step"], unique=True)
    op.create_table(
        "checkpoints",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
    )
    op.create_index("ix_checkpoints_job_step", "checkpoints", ["job_id", "step"], unique=True)


def downgrade() -> None:
    for table in ("checkpoints", "events", "jobs", "files", "api_keys"):
        op.drop_table(table)
