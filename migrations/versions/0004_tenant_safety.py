"""tenant safety: Cognito app clients mapped to tenants (spec 14.2)

Jobs already carry a nullable ``client_id``; existing jobs without one stay platform jobs
(spec 14.1): nothing is backfilled that cannot be known.

Revision ID: 0004
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'client_app_clients',
        sa.Column('app_client_id', sa.String(length=128), nullable=False),
        sa.Column('client_id', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(
            ['client_id'], ['clients.client_id'], name=op.f('fk_client_app_clients_client_id_clients'), ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('app_client_id', name=op.f('pk_client_app_clients')),
    )
    op.create_index(op.f('ix_client_app_clients_client_id'), 'client_app_clients', ['client_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_client_app_clients_client_id'), table_name='client_app_clients')
    op.drop_table('client_app_clients')
