"""Tables: webhooks (endpoints), webhook_events (what happened, written in the transaction of the
change) and webhook_deliveries (the outbox: one row per event and webhook, the delivery queue and
its log)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base, Timestamps


class Webhook(Timestamps, Base):
    __tablename__ = "webhooks"

    # UUIDv7: time-ordered (the list's order and cursor)
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("pie_uuid7()"))
    # the tenant; NULL: a platform webhook (receives every tenant's events and the registry's)
    client_id: Mapped[str | None] = mapped_column(String(128), ForeignKey("clients.client_id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    description: Mapped[str | None]
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    # why the webhook was disabled by PIE (a receiver answered 410 Gone); NULL when a caller did it
    disabled_reason: Mapped[str | None]
    # the signing secret (Standard Webhooks ``whsec_`` form): never returned after creation or
    # rotation, never logged; the previous one keeps signing until ``previous_secret_expires_at``
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at: Mapped[datetime | None]
    # who wrote the row (pie.audit.schemas.Actor)
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))

    __table_args__ = (
        CheckConstraint("status IN ('active', 'disabled')", name="status"),
        Index("ix_webhooks_client", "client_id", "id"),
    )


class WebhookEvent(Base):
    __tablename__ = "webhook_events"

    # UUIDv7; sent as ``webhook-id`` on every attempt of every delivery of this event
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("pie_uuid7()"))
    type: Mapped[str] = mapped_column(String(32))
    # the tenant the event belongs to (NULL: a platform event, e.g. a platform job)
    client_id: Mapped[str | None] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))

    __table_args__ = (Index("ix_webhook_events_created", "created_at"),)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    # no foreign key on purpose: the outbox insert (in the transaction of a job's end) must never
    # fail because a webhook was deleted concurrently; a delivery whose webhook is gone is never
    # claimed (claims join webhooks) and is removed with its event by the retention sweep
    webhook_id: Mapped[uuid.UUID]
    # pending (queued or being attempted) -> delivered | failed (gave up, or the receiver said 410)
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # when the next attempt is due; a claim moves it past the attempt's lease, so the delivery
    # of a process that died is attempted again once the lease ends
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None]
    # the receiver's last response body, at most 1 KiB of it
    last_response: Mapped[str | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        UniqueConstraint("event_id", "webhook_id", name="uq_webhook_deliveries_event_webhook"),
        # the delivery queue, per webhook (a claim takes a bounded number per webhook)
        Index(
            "ix_webhook_deliveries_due", "webhook_id", "next_attempt_at", postgresql_where=text("status = 'pending'")
        ),
        # a webhook's delivery log, newest first
        Index("ix_webhook_deliveries_webhook", "webhook_id", "id"),
    )
