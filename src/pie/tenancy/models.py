"""Tables of the tenant side: domains and services."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, ForeignKeyConstraint, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base, Timestamps


class Domain(Timestamps, Base):
    __tablename__ = "domains"

    client_id: Mapped[str] = mapped_column(String(128), ForeignKey("clients.client_id"), primary_key=True)
    domain_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str | None]
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    # the live feature definitions (the next-train draft)
    features: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))
    # who wrote the row (pie.audit.schemas.Actor); NULL before the audit trail and for platform writes
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))

    __table_args__ = (CheckConstraint("status IN ('active', 'inactive')", name="status"),)


def departed(departure_datetime: datetime | None) -> bool:
    """Departed: ``departure_datetime`` set and not in the future (spec 5.5)."""
    return departure_datetime is not None and departure_datetime <= datetime.now(timezone.utc)


class Service(Timestamps, Base):
    __tablename__ = "services"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    domain_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    service_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), server_default="initializing")
    departure_datetime: Mapped[datetime | None]
    provided_features: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    resolved_features: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # who wrote the row (pie.audit.schemas.Actor); NULL before the audit trail and for platform writes
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))

    __table_args__ = (
        ForeignKeyConstraint(
            ["client_id", "domain_id"], ["domains.client_id", "domains.domain_id"], name="fk_services_domain"
        ),
        CheckConstraint("status IN ('initializing', 'available', 'failed')", name="status"),
        Index("ix_services_departure", "client_id", "domain_id", "departure_datetime"),
    )

    @property
    def departed(self) -> bool:
        return departed(self.departure_datetime)
