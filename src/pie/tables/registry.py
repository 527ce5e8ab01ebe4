"""Tables of the model registry: models, model versions, event subscriptions."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, ForeignKeyConstraint, Identity, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base, Timestamps


class Model(Timestamps, Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str]
    description: Mapped[str] = mapped_column(server_default="")
    handlers: Mapped[dict[str, Any]]
    handler_contracts: Mapped[dict[str, Any] | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    # highest integer version allocated so far; bumped under the model row lock
    version_counter: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), unique=True)

    __table_args__ = (CheckConstraint("status IN ('pending', 'active')", name="status"),)


class ModelVersion(Timestamps, Base):
    __tablename__ = "model_versions"

    model_id: Mapped[str] = mapped_column(String(128), ForeignKey("models.id"), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(server_default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    handlers: Mapped[dict[str, Any]]
    handler_contracts: Mapped[dict[str, Any] | None]
    # the frozen feature schema; NULL until set, then never changed
    features: Mapped[list[Any] | None]
    # who wrote the row (pie.audit.schemas.Actor); NULL before the audit trail and for platform writes
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # creation order (newest active version = highest seq)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), unique=True)

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'training', 'active', 'failed', 'archived')", name="status"),
        Index("ix_model_versions_model_status", "model_id", "status", "seq"),
    )


class EventSubscription(Timestamps, Base):
    __tablename__ = "event_subscriptions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    source_model_id: Mapped[str] = mapped_column(String(128), ForeignKey("models.id"), index=True)
    trigger_event: Mapped[str] = mapped_column(String(32))
    target_model_id: Mapped[str] = mapped_column(String(128), ForeignKey("models.id"), index=True)
    target_action: Mapped[str] = mapped_column(String(16))
    input_source: Mapped[str] = mapped_column(String(16))
    input: Mapped[dict[str, Any] | None]
    label: Mapped[str | None]
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    warnings: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))
    # set for replay subscriptions created by ``subscribe: true`` on an assignment job:
    # the replay re-runs through the same assignment key in the same scope
    client_id: Mapped[str | None] = mapped_column(String(128))
    domain_id: Mapped[str | None] = mapped_column(String(128))
    service_id: Mapped[str | None] = mapped_column(String(128))
    assignment_key: Mapped[str | None] = mapped_column(String(64))
    # who wrote the row (pie.audit.schemas.Actor); NULL before the audit trail and for platform writes
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))

    __table_args__ = (
        CheckConstraint("trigger_event IN ('training_complete', 'inference_complete')", name="trigger_event"),
        CheckConstraint("target_action IN ('inference', 'training')", name="target_action"),
        CheckConstraint("input_source IN ('stored', 'trigger_output')", name="input_source"),
        CheckConstraint("status IN ('active', 'paused', 'stale')", name="status"),
        CheckConstraint("input_source <> 'stored' OR input IS NOT NULL", name="stored_input"),
        ForeignKeyConstraint(
            ["client_id", "domain_id"], ["domains.client_id", "domains.domain_id"], name="fk_event_subscriptions_domain"
        ),
    )
