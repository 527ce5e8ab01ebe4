"""experiments: split and shadow versions on assignment revisions, the arm of each job (spec 15.7)

- ``assignments.split`` ``[{model_id, model_version, percent}]`` and ``assignments.shadow``
  ``[{model_id, model_version}]`` (JSONB, default ``[]``: no experiment);
- ``jobs.arm`` ('primary' | 'split' | 'shadow'; NULL for jobs not launched through an assignment
  key, and for every job written before this revision) and ``jobs.shadow_of`` (the job a
  shadow job copies), with their checks, foreign key and index.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "assignments",
        sa.Column(
            "split", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
    )
    op.add_column(
        "assignments",
        sa.Column(
            "shadow", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
    )
    op.add_column("jobs", sa.Column("arm", sa.String(length=16), nullable=True))
    op.add_column("jobs", sa.Column("shadow_of", sa.String(length=64), nullable=True))
    op.create_check_constraint("arm", "jobs", "arm IN ('primary', 'split', 'shadow')")
    op.create_check_constraint("shadow_of", "jobs", "(arm = 'shadow') = (shadow_of IS NOT NULL)")
    op.create_foreign_key("fk_jobs_shadow_of", "jobs", "jobs", ["shadow_of"], ["job_id"])
    op.create_index(
        "ix_jobs_shadow_of", "jobs", ["shadow_of"], unique=False, postgresql_where=sa.text("shadow_of IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_shadow_of", table_name="jobs", postgresql_where=sa.text("shadow_of IS NOT NULL"))
    op.drop_constraint("fk_jobs_shadow_of", "jobs", type_="foreignkey")
    op.drop_constraint(op.f("ck_jobs_shadow_of"), "jobs", type_="check")
    op.drop_constraint(op.f("ck_jobs_arm"), "jobs", type_="check")
    op.drop_column("jobs", "shadow_of")
    op.drop_column("jobs", "arm")
    op.drop_column("assignments", "shadow")
    op.drop_column("assignments", "split")
