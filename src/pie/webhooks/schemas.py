"""Request and response bodies of the webhook routes (spec 15.6)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, field_validator

from pie.audit.schemas import CREATED_BY, Actor
from pie.schemas import RequestBody, ResponseBody, UtcDatetime
from pie.webhooks.events import EventType

WebhookStatus = Literal["active", "disabled"]
DeliveryStatus = Literal["pending", "delivered", "failed"]
MAX_URL_LENGTH = 2048

_EVENTS_DOC = (
    "event types to receive (at least one): job.succeeded, job.failed, service.available, service.failed, "
    "assignment.changed; version.status_changed on platform webhooks only"
)


def _unique(events: list[str]) -> list[str]:
    return sorted(set(events))


class WebhookCreate(RequestBody):
    url: str = Field(
        max_length=MAX_URL_LENGTH,
        description="https URL receiving POSTed events; its host must resolve to public addresses",
        examples=["https://hooks.example.com/pie"],
    )
    events: list[EventType] = Field(min_length=1, max_length=16, description=_EVENTS_DOC)
    description: str | None = Field(default=None, max_length=10_000)

    @field_validator("events")
    @classmethod
    def _events(cls, events: list[str]) -> list[str]:
        return _unique(events)


class WebhookUpdate(RequestBody):
    """Only the fields sent change. ``status: active`` re-enables a webhook (also one PIE
    disabled after a 410); deliveries that were waiting resume."""

    url: str | None = Field(default=None, max_length=MAX_URL_LENGTH)
    events: list[EventType] | None = Field(default=None, min_length=1, max_length=16, description=_EVENTS_DOC)
    description: str | None = Field(default=None, max_length=10_000)
    status: WebhookStatus | None = None

    @field_validator("events")
    @classmethod
    def _events(cls, events: list[str] | None) -> list[str] | None:
        return None if events is None else _unique(events)


class WebhookOut(ResponseBody):
    id: uuid.UUID
    client_id: str | None = Field(description="the tenant; null for a platform webhook")
    url: str
    events: list[str]
    description: str | None
    status: WebhookStatus
    disabled_reason: str | None = Field(
        default=None, description="why PIE disabled the webhook (its receiver answered 410 Gone); null otherwise"
    )
    previous_secret_expires_at: UtcDatetime | None = Field(
        default=None,
        description="after a rotation: until when deliveries also carry a signature with the previous secret",
    )
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    updated_at: UtcDatetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="the signing secret, Standard Webhooks `whsec_` form: shown only in this answer",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class SecretOut(ResponseBody):
    secret: str = Field(description="the new signing secret (`whsec_` form): shown only in this answer")
    previous_secret_expires_at: UtcDatetime = Field(
        description="until then deliveries are signed with both the new and the previous secret"
    )


class DeliveryOut(ResponseBody):
    id: int = Field(description="the delivery's position in the log")
    event_id: uuid.UUID = Field(description="sent as the `webhook-id` header, the same on every attempt")
    type: str = Field(description="the event type")
    status: DeliveryStatus = Field(description="pending (queued or being retried), delivered, failed (gave up)")
    attempts: int
    last_status_code: int | None = Field(description="the receiver's last HTTP status; null when none answered")
    last_error: str | None = Field(description="why the last attempt failed (network errors, refused targets)")
    last_response: str | None = Field(description="the receiver's last response body, at most 1 KiB of it")
    created_at: UtcDatetime = Field(description="when the event happened")
    last_attempt_at: UtcDatetime | None
    next_attempt_at: UtcDatetime | None = Field(description="pending deliveries: when the next attempt is due")
    delivered_at: UtcDatetime | None


class PingQueued(ResponseBody):
    event_id: uuid.UUID = Field(description="the ping's `webhook-id`; follow it in the deliveries log")
    type: Literal["ping"] = "ping"


def delivery_out(row: Any) -> dict[str, Any]:
    """A log row as answered: ``next_attempt_at`` only while the delivery is pending."""
    out = dict(row._mapping)
    if out["status"] != "pending":
        out["next_attempt_at"] = None
    return out
