"""callback tokens: signing_keys; jobs.timeout_seconds

Revision ID: 0006
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'signing_keys',
        sa.Column('kid', sa.String(length=64), nullable=False),
        sa.Column('secret', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('kid', name=op.f('pk_signing_keys')),
    )
    op.add_column('jobs', sa.Column('timeout_seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'timeout_seconds')
    op.drop_table('signing_keys')
