"""Assignment revisions: a stable key bound to one model version in a domain or service scope."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKeyConstraint, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base, Timestamps


class Assignment(Timestamps, Base):
    __tablename__ = "assignments"

    assignment_id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    client_id: Mapped[str] = mapped_column(String(128))
    domain_id: Mapped[str] = mapped_column(String(128))
    service_id: Mapped[str | None] = mapped_column(String(128))  # NULL = domain scope
    assignment_key: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    role: Mapped[str | None]
    settings: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    # domain-scope `default` revisions: the feature schema that governs the domain while this
    # revision is active, taken when it was written (spec 15.1); NULL on every other revision
    governing_schema: Mapped[list[Any] | None] = mapped_column(JSONB(none_as_null=True))
    # the experiment on this revision (spec 15.7): ``[{model_id, model_version, percent}]`` arms
    # that take a share of the launches (the primary takes the rest) and ``[{model_id,
    # model_version}]`` versions that get a shadow copy of every launch; empty: no experiment
    split: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    shadow: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    # who wrote the row (pie.audit.schemas.Actor); NULL before the audit trail and for platform writes
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))

    __table_args__ = (
        CheckConstraint("status IN ('active', 'archived')", name="status"),
        ForeignKeyConstraint(
            ["client_id", "domain_id"], ["domains.client_id", "domains.domain_id"], name="fk_assignments_domain"
        ),
        # no foreign key to services: a deleted service's revisions stay as the history of its id
        # (spec 15.4); a service-scope upsert checks the service under its row lock
        ForeignKeyConstraint(
            ["model_id", "model_version"],
            ["model_versions.model_id", "model_versions.version"],
            name="fk_assignments_model_version",
        ),
        # exactly one active revision per (scope, key)
        Index(
            "uq_assignments_active_domain_key",
            "client_id",
            "domain_id",
            "assignment_key",
            unique=True,
            postgresql_where=text("status = 'active' AND service_id IS NULL"),
        ),
        Index(
            "uq_assignments_active_service_key",
            "client_id",
            "domain_id",
            "service_id",
            "assignment_key",
            unique=True,
            postgresql_where=text("status = 'active' AND service_id IS NOT NULL"),
        ),
        Index("ix_assignments_scope_key", "client_id", "domain_id", "service_id", "assignment_key", "created_at"),
    )
