"""webhooks: endpoints, events (the outbox) and deliveries

Revision ID: 0009
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'webhooks',
        sa.Column('id', sa.Uuid(), server_default=sa.text('pie_uuid7()'), nullable=False),
        sa.Column('client_id', sa.String(length=128), nullable=True),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('events', postgresql.ARRAY(sa.String(length=32)), nullable=False),
        sa.Column('description', sa.String(), nullable=True),
        sa.Column('status', sa.String(length=16), server_default='active', nullable=False),
        sa.Column('disabled_reason', sa.String(), nullable=True),
        sa.Column('secret', sa.String(length=128), nullable=False),
        sa.Column('previous_secret', sa.String(length=128), nullable=True),
        sa.Column('previous_secret_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_by', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("status IN ('active', 'disabled')", name=op.f('ck_webhooks_status')),
        sa.ForeignKeyConstraint(
            ['client_id'], ['clients.client_id'], name=op.f('fk_webhooks_client_id_clients'), ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhooks')),
    )
    op.create_index('ix_webhooks_client', 'webhooks', ['client_id', 'id'], unique=False)
    op.create_table(
        'webhook_events',
        sa.Column('id', sa.Uuid(), server_default=sa.text('pie_uuid7()'), nullable=False),
        sa.Column('type', sa.String(length=32), nullable=False),
        sa.Column('client_id', sa.String(length=128), nullable=True),
        sa.Column('data', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_events')),
    )
    op.create_index('ix_webhook_events_created', 'webhook_events', ['created_at'], unique=False)
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column('event_id', sa.Uuid(), nullable=False),
        sa.Column('webhook_id', sa.Uuid(), nullable=False),
        sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(), nullable=True),
        sa.Column('last_response', sa.String(), nullable=True),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f('ck_webhook_deliveries_status')),
        sa.ForeignKeyConstraint(
            ['event_id'],
            ['webhook_events.id'],
            name=op.f('fk_webhook_deliveries_event_id_webhook_events'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
        sa.UniqueConstraint('event_id', 'webhook_id', name='uq_webhook_deliveries_event_webhook'),
    )
    op.create_index(
        'ix_webhook_deliveries_due',
        'webhook_deliveries',
        ['webhook_id', 'next_attempt_at'],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index('ix_webhook_deliveries_webhook', 'webhook_deliveries', ['webhook_id', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_webhook', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_events_created', table_name='webhook_events')
    op.drop_table('webhook_events')
    op.drop_index('ix_webhooks_client', table_name='webhooks')
    op.drop_table('webhooks')
