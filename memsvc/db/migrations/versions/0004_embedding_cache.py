"""embedding cache and contextual chunks: chunks.embed_key, collections.context

`chunks.embed_key` is the sha256 of the embedder's name and the exact text embedded for the chunk, so an
upsert of a changed document copies the vectors of its unchanged chunks instead of embedding them again
(NULL for chunks stored before: those are embedded once more on their next change). `collections.context`
is the collection's contextual-chunk setting ("title", "trail", or NULL: plain chunks).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("embed_key", sa.String(64), nullable=True))
    with op.batch_alter_table("collections") as batch:
        batch.add_column(sa.Column("context", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.drop_column("context")
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("embed_key")
