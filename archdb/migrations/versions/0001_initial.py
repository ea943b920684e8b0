"""Initial archive schema: base models, protocols, architectures, evaluations.

Revision ID: 0001_initial
Revises: 
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False),
    sa.Column('family', sa.String(length=40), nullable=False),
    sa.Column('config_hash', sa.String(length=64), nullable=False),
    sa.Column('location', sa.Text(), nullable=True),
    sa.Column('revision', sa.String(length=200), nullable=True),
    sa.Column('num_layers', sa.Integer(), nullable=False),
    sa.Column('hidden_size', sa.Integer(), nullable=False),
    sa.Column('num_heads', sa.Integer(), nullable=False),
    sa.Column('num_kv_heads', sa.Integer(), nullable=False),
    sa.Column('head_dim', sa.Integer(), nullable=False),
    sa.Column('intermediate_size', sa.Integer(), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('tie_embeddings', sa.Boolean(), nullable=False),
    sa.Column('qkv_bias', sa.Boolean(), nullable=False),
    sa.Column('o_bias', sa.Boolean(), nullable=False),
    sa.Column('mlp_bias', sa.Boolean(), nullable=False),
    sa.Column('total_params', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_models_config_hash'), ['config_hash'], unique=False)

    op.create_table('protocols',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('dataset', sa.String(length=500), nullable=False),
    sa.Column('split', sa.String(length=500), nullable=False),
    sa.Column('joining', sa.String(length=500), nullable=False),
    sa.Column('tokenizer', sa.String(length=500), nullable=False),
    sa.Column('tokenizer_hash', sa.String(length=500), nullable=False),
    sa.Column('seq_len', sa.Integer(), nullable=True),
    sa.Column('tokens', sa.BigInteger(), nullable=True),
    sa.Column('questions', sa.BigInteger(), nullable=True),
    sa.Column('shots', sa.Integer(), nullable=True),
    sa.Column('tool', sa.String(length=500), nullable=False),
    sa.Column('tool_version', sa.String(length=500), nullable=False),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    op.create_table('architectures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('arch_hash', sa.String(length=64), nullable=False),
    sa.Column('encoding', sa.Text(), nullable=False),
    sa.Column('params', sa.BigInteger(), nullable=False),
    sa.Column('origin', sa.String(length=20), nullable=False),
    sa.Column('importance', sa.String(length=40), nullable=True),
    sa.Column('calibration', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('base_model_id', 'arch_hash', name='uq_arch_per_base')
    )
    with op.batch_alter_table('architectures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_architectures_arch_hash'), ['arch_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_architectures_base_model_id'), ['base_model_id'], unique=False)

    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('architecture_id', sa.Integer(), nullable=False),
    sa.Column('metric', sa.String(length=200), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('protocol_id', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('device', sa.String(length=200), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('retracted_at', sa.DateTime(), nullable=True),
    sa.Column('retract_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['architecture_id'], ['architectures.id'], ),
    sa.ForeignKeyConstraint(['protocol_id'], ['protocols.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('architecture_id', 'metric', 'protocol_id', name='uq_eval_arch_metric_protocol')
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index('ix_eval_metric_protocol', ['metric', 'protocol_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_architecture_id'), ['architecture_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_architecture_id'))
        batch_op.drop_index('ix_eval_metric_protocol')

    op.drop_table('evaluations')
    with op.batch_alter_table('architectures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_architectures_base_model_id'))
        batch_op.drop_index(batch_op.f('ix_architectures_arch_hash'))

    op.drop_table('architectures')
    op.drop_table('protocols')
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_models_config_hash'))

    op.drop_table('base_models')
