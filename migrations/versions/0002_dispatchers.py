"""dispatchers: registration and heartbeats of running dispatchers

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dispatchers',
        sa.Column('id', sa.String(length=128), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('workers', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_dispatchers')),
    )
    op.create_index(op.f('ix_dispatchers_heartbeat_at'), 'dispatchers', ['heartbeat_at'], unique=False)
    # started jobs by their dispatcher, for the dead-dispatcher sweep
    op.create_index(
        'ix_jobs_locked_by', 'jobs', ['locked_by'], unique=False, postgresql_where=sa.text("status = 'started'")
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_locked_by', table_name='jobs', postgresql_where=sa.text("status = 'started'"))
    op.drop_index(op.f('ix_dispatchers_heartbeat_at'), table_name='dispatchers')
    op.drop_table('dispatchers')
