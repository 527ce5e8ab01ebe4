"""audit trail: created_by on written rows, the version status history, the audit log

Revision ID: 0005
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# the tables' owner (the app's own role) cannot be refused UPDATE/DELETE by REVOKE: a trigger does it
APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION pie_append_only() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""
APPEND_ONLY_TABLES = ("audit_log", "model_version_status_history")

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

CREATED_BY_TABLES = ("assignments", "model_versions", "jobs", "event_subscriptions", "domains", "services")


def upgrade() -> None:
    # nullable, no default: rows from before this migration have no known actor
    for table in CREATED_BY_TABLES:
        op.add_column(table, sa.Column('created_by', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True))
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('method', sa.String(length=8), nullable=False),
    sa.Column('path', sa.String(), nullable=False),
    sa.Column('target_type', sa.String(length=32), nullable=False),
    sa.Column('target_id', sa.String(), nullable=True),
    sa.Column('client_id', sa.String(length=128), nullable=True),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.Column('actor_sub', sa.String(), nullable=True),
    sa.Column('actor_username', sa.String(), nullable=True),
    sa.Column('actor_client_id', sa.String(), nullable=True),
    sa.Column('summary', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_index('ix_audit_log_client', 'audit_log', ['client_id', 'id'], unique=False)
    op.create_index('ix_audit_log_target', 'audit_log', ['target_type', 'target_id', 'id'], unique=False)
    op.create_table('model_version_status_history',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('model_id', sa.String(length=128), nullable=False),
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('from_status', sa.String(length=16), nullable=True),
    sa.Column('to_status', sa.String(length=16), nullable=False),
    sa.Column('changed_by', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.Column('changed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['model_id', 'version'], ['model_versions.model_id', 'model_versions.version'], name='fk_model_version_status_history_version'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_version_status_history'))
    )
    op.create_index('ix_model_version_status_history_version', 'model_version_status_history', ['model_id', 'version', 'id'], unique=False)
    op.execute(APPEND_ONLY_FUNCTION)
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION pie_append_only()"
        )


def downgrade() -> None:
    op.drop_index('ix_model_version_status_history_version', table_name='model_version_status_history')
    op.drop_table('model_version_status_history')
    op.drop_index('ix_audit_log_target', table_name='audit_log')
    op.drop_index('ix_audit_log_client', table_name='audit_log')
    op.drop_table('audit_log')
    op.execute("DROP FUNCTION IF EXISTS pie_append_only()")
    for table in CREATED_BY_TABLES:
        op.drop_column(table, 'created_by')
