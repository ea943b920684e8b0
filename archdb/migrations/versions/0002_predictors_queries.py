"""Predictor versions (with their joblib artifacts) and answered queries.

Revision ID: 0002_predictors_queries
Revises: 0001_initial
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0002_predictors_queries'
down_revision = '0001_initial'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('predictors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('metric', sa.String(length=200), nullable=False),
    sa.Column('protocol_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('algorithm', sa.String(length=60), nullable=False),
    sa.Column('hyperparams', sa.JSON(), nullable=False),
    sa.Column('feature_set', sa.String(length=40), nullable=False),
    sa.Column('features', sa.JSON(), nullable=False),
    sa.Column('trained_on', sa.JSON(), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('last_evaluation_id', sa.Integer(), nullable=False),
    sa.Column('cv', sa.JSON(), nullable=False),
    sa.Column('library_versions', sa.JSON(), nullable=False),
    sa.Column('artifact', sa.LargeBinary(), nullable=False),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], ),
    sa.ForeignKeyConstraint(['protocol_id'], ['protocols.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('base_model_id', 'metric', 'protocol_id', 'version', name='uq_predictor_version')
    )
    with op.batch_alter_table('predictors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictors_base_model_id'), ['base_model_id'], unique=False)

    op.create_table('queries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('query_key', sa.String(length=64), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('target_params', sa.BigInteger(), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('elapsed_ms', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('query_key')
    )
    with op.batch_alter_table('queries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_queries_base_model_id'), ['base_model_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('queries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_queries_base_model_id'))

    op.drop_table('queries')
    with op.batch_alter_table('predictors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictors_base_model_id'))

    op.drop_table('predictors')
