"""lifecycle operations (spec 15.4): archived versions, job cancel/retry bookkeeping, ECS task
stops, deletable services

- ``model_versions.status`` may be ``archived``;
- ``jobs.cancelled_at`` (a cancelled job answers every later completion with 409),
  ``jobs.retry_of`` (the job a retry re-runs) and ``jobs.ecs_task`` (``{cluster, task_arn}`` of
  the task ECS started, so a cancel can stop it);
- ``task_stops``: ECS tasks to stop (the outbox of cancellations, worked by the dispatchers);
- ``assignments`` loses its foreign key to ``services``: deleting a service keeps its
  service-scope revisions as the history of its id (jobs keep pointing at them).

Downgrade: archived versions become ``active`` again, pending stops are dropped, and the
foreign key to ``services`` comes back ``NOT VALID`` (revisions of deleted services stay).

Revision ID: 0008
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint(op.f('ck_model_versions_status'), 'model_versions', type_='check')
    op.create_check_constraint(
        op.f('ck_model_versions_status'),
        'model_versions',
        "status IN ('pending', 'training', 'active', 'failed', 'archived')",
    )

    op.add_column('jobs', sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('retry_of', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('ecs_task', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.create_foreign_key('fk_jobs_retry_of', 'jobs', 'jobs', ['retry_of'], ['job_id'])

    op.create_table(
        'task_stops',
        sa.Column('task_arn', sa.String(length=2048), nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('cluster', sa.String(length=255), nullable=False),
        sa.Column('reason', sa.String(length=255), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('last_error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.job_id'], name='fk_task_stops_job'),
        sa.PrimaryKeyConstraint('task_arn', name=op.f('pk_task_stops')),
    )
    op.create_index('ix_task_stops_due', 'task_stops', ['next_attempt_at'], unique=False)
    op.create_index('ix_task_stops_job', 'task_stops', ['job_id'], unique=False)

    op.drop_constraint('fk_assignments_service', 'assignments', type_='foreignkey')


def downgrade() -> None:
    op.create_foreign_key(
        'fk_assignments_service',
        'assignments',
        'services',
        ['client_id', 'domain_id', 'service_id'],
        ['client_id', 'domain_id', 'service_id'],
        postgresql_not_valid=True,
    )
    op.drop_index('ix_task_stops_job', table_name='task_stops')
    op.drop_index('ix_task_stops_due', table_name='task_stops')
    op.drop_table('task_stops')
    op.drop_constraint('fk_jobs_retry_of', 'jobs', type_='foreignkey')
    op.drop_column('jobs', 'ecs_task')
    op.drop_column('jobs', 'retry_of')
    op.drop_column('jobs', 'cancelled_at')
    op.execute("UPDATE model_versions SET status = 'active' WHERE status = 'archived'")
    op.drop_constraint(op.f('ck_model_versions_status'), 'model_versions', type_='check')
    op.create_check_constraint(
        op.f('ck_model_versions_status'),
        'model_versions',
        "status IN ('pending', 'training', 'active', 'failed')",
    )
