"""chunk id index: a collection search looks up its k hits by chunk id

Looking the hits up by chunk id alone through this index takes 0.4 ms at 100K chunks, where the
collection's every chunk row was read before (42 ms; bench/results/retrieval.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_chunks_chunk_id"), "chunks", ["chunk_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_chunks_chunk_id"), table_name="chunks")
