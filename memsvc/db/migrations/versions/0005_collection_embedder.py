"""collections.embedder: the embedder that made a collection's vectors

The model and its backend, e.g. "all-MiniLM-L6-v2" (PyTorch) or "all-MiniLM-L6-v2+openvino-int8"
(`retrievers.encoders.embedder_name`). A collection keeps embedding its chunks and queries with it, so all
vectors of its memory and its queries come from one embedder. NULL for collections made before: those
were embedded by all-MiniLM-L6-v2 in PyTorch, and are read as such.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.add_column(sa.Column("embedder", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.drop_column("embedder")
