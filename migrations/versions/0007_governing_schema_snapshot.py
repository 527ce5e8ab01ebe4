"""governing schema snapshot on domain default revisions; jobs.domain_features, jobs.dispatch_error

Issue 17 (spec 15.1, 15.3):

* ``assignments.governing_schema``: the feature schema that governs a domain, stored on each
  domain-scope ``default`` revision when it is written. Every active one is backfilled with the
  schema that governs it today (the version's frozen schema, else the domain's live features),
  so no deployed domain changes meaning on upgrade. Archived revisions stay NULL (what governed
  them back then is not known).
* ``jobs.domain_features``: the domain's live features a training job launched through a domain
  assignment carries (jobs no longer write a version's frozen schema).
* ``jobs.dispatch_error``: the latest failed dispatch that was retried. A job's ``error`` is now
  set only when it fails: the errors of jobs that have not failed move here, and pending jobs
  lose ``started_at`` (they are waiting for a retry, not running).

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('assignments', sa.Column('governing_schema', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('jobs', sa.Column('domain_features', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('jobs', sa.Column('dispatch_error', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    # the schema that governs each active domain default today (spec 5.3 as it stood): the
    # version's frozen schema (SQL NULL or a JSON null: none), else the domain's live features
    op.execute(
        """
        UPDATE assignments AS a
        SET governing_schema = CASE
                WHEN mv.features IS NOT NULL AND jsonb_typeof(mv.features) <> 'null' THEN mv.features
                ELSE d.features
            END
        FROM model_versions AS mv, domains AS d
        WHERE a.service_id IS NULL AND a.assignment_key = 'default' AND a.status = 'active'
          AND mv.model_id = a.model_id AND mv.version = a.model_version
          AND d.client_id = a.client_id AND d.domain_id = a.domain_id
        """
    )
    op.execute(
        """
        UPDATE jobs SET dispatch_error = error, error = NULL,
            started_at = CASE WHEN status = 'pending' THEN NULL ELSE started_at END
        WHERE status <> 'failure' AND error IS NOT NULL
        """
    )
    op.execute("UPDATE jobs SET started_at = NULL WHERE status = 'pending' AND started_at IS NOT NULL")


def downgrade() -> None:
    # the old shape showed a retried dispatch's error on the job itself
    op.execute(
        """
        UPDATE jobs SET error = dispatch_error
        WHERE status IN ('pending', 'started') AND error IS NULL AND dispatch_error IS NOT NULL
        """
    )
    op.drop_column('jobs', 'dispatch_error')
    op.drop_column('jobs', 'domain_features')
    op.drop_column('assignments', 'governing_schema')
