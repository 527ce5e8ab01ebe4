"""The audit log and the model version status history: append-only tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKeyConstraint, Identity, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base

# append-only: migration 0005 adds a trigger refusing UPDATE and DELETE on both tables (the app's
# own role owns them, so REVOKE cannot take those rights away); TRUNCATE is the owner's maintenance


class AuditRecord(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    action: Mapped[str] = mapped_column(String(64))  # the OpenAPI operation id
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str]
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None]
    client_id: Mapped[str | None] = mapped_column(String(128))  # the tenant; NULL = platform
    request_id: Mapped[str | None] = mapped_column(String(128))
    actor_sub: Mapped[str | None]
    actor_username: Mapped[str | None]
    actor_client_id: Mapped[str | None]
    summary: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))

    # two indexes only (each write pays for them): the tenant listing and the target history;
    # the actor filter (sub OR username OR client_id) runs within those
    __table_args__ = (
        Index("ix_audit_log_client", "client_id", "id"),
        Index("ix_audit_log_target", "target_type", "target_id", "id"),
    )

    @property
    def actor(self) -> dict[str, Any]:
        return {"sub": self.actor_sub, "username": self.actor_username, "client_id": self.actor_client_id}


class VersionStatusChange(Base):
    __tablename__ = "model_version_status_history"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    changed_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    changed_at: Mapped[datetime] = mapped_column(server_default=text("now()"))

    __table_args__ = (
        ForeignKeyConstraint(
            ["model_id", "version"],
            ["model_versions.model_id", "model_versions.version"],
            name="fk_model_version_status_history_version",
        ),
        Index("ix_model_version_status_history_version", "model_id", "version", "id"),
    )
