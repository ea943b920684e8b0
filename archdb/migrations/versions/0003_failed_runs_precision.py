"""Failed runs (measurements that gave no value) and the precision a protocol's model ran in.

Existing protocols were all measured as archopt recorded them before precision existed: float32
(the server default fills the new column), which keeps their keys.

Revision ID: 0003_failed_runs_precision
Revises: 0002_predictors_queries
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_failed_runs_precision'
down_revision = '0002_predictors_queries'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE on both backends: SQLite adds a column with a constant default in place
    # (batch mode would copy the table, which other tables' foreign keys point to)
    op.add_column('protocols', sa.Column('precision', sa.String(length=20), server_default='float32', nullable=False))

    op.create_table('failed_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('architecture_id', sa.Integer(), nullable=False),
    sa.Column('metric', sa.String(length=200), nullable=False),
    sa.Column('protocol_id', sa.Integer(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('device', sa.String(length=200), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['architecture_id'], ['architectures.id'], ),
    sa.ForeignKeyConstraint(['protocol_id'], ['protocols.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('architecture_id', 'metric', 'protocol_id', name='uq_failed_arch_metric_protocol')
    )
    with op.batch_alter_table('failed_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_failed_runs_architecture_id'), ['architecture_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('failed_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_failed_runs_architecture_id'))

    op.drop_table('failed_runs')
    # native ALTER TABLE ... DROP COLUMN (SQLite 3.35+, PostgreSQL)
    op.drop_column('protocols', 'precision')
