"""The runtime a protocol's model ran in: ``transformers`` (archopt's own forward pass) or ``llama.cpp``
(a GGUF written by ``archopt prune --format gguf``).

Every existing protocol ran in transformers: the server default fills the new column, and the
canonical JSON leaves the default runtime out, so no stored protocol key changes.

Revision ID: 0004_protocol_runtime
Revises: 0003_failed_runs_precision
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_protocol_runtime'
down_revision = '0003_failed_runs_precision'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE with a constant default on both backends (as 0003's precision)
    op.add_column('protocols', sa.Column('runtime', sa.String(length=40), server_default='transformers',
                                         nullable=False))


def downgrade() -> None:
    op.drop_column('protocols', 'runtime')
