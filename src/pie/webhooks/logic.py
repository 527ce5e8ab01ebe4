"""Webhooks (spec 15.6): plain functions over a session; they flush, never commit.

A webhook belongs to a tenant (``client_id``) or to the platform (``client_id`` None); every
function takes the scope it is called in and never sees a webhook of another scope (404).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import Response
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from pie.audit import context as audit
from pie.config import Settings
from pie.errors import NotFound, Unprocessable
from pie.pagination import PageParams, paginate
from pie.tables.clients import Client
from pie.tables.webhooks import Webhook, WebhookDelivery, WebhookEvent
from pie.webhooks.events import PING, PLATFORM_ONLY
from pie.webhooks.outbox import NOTIFY_CHANNEL
from pie.webhooks.safety import UnsafeTarget, check_target
from pie.webhooks.schemas import WebhookCreate, WebhookUpdate

# after a rotation the previous secret still signs for this long (receivers roll over)
ROTATION_OVERLAP = timedelta(hours=24)
SECRET_BYTES = 32


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _scope_name(client_id: str | None) -> str:
    return f"client {client_id}" if client_id is not None else "the platform"


async def _ensure_writable(session: AsyncSession, client_id: str | None) -> None:
    """Spec 4: every write under a suspended client is 422 (the row held FOR SHARE until the
    write commits, as ``pie.tenancy.logic.ensure_writable`` does for the other tenant writes)."""
    if client_id is None:
        return
    status = await session.scalar(select(Client.status).where(Client.client_id == client_id).with_for_update(read=True))
    if status != "active":
        raise Unprocessable(f"client {client_id} is suspended")


def _check_events(client_id: str | None, events: list[str]) -> None:
    if client_id is not None:
        platform_only = sorted(set(events) & PLATFORM_ONLY)
        if platform_only:
            raise Unprocessable(f"{', '.join(platform_only)} can only be sent to platform webhooks (/v2/webhooks)")


async def _check_url(settings: Settings, url: str) -> str:
    url = url.strip()
    try:
        await check_target(url, allow_http=settings.webhooks_allow_http, allow_private=settings.webhooks_allow_private)
    except UnsafeTarget as exc:
        raise Unprocessable(f"invalid webhook url: {exc}") from None
    return url


async def create_webhook(
    session: AsyncSession, settings: Settings, client_id: str | None, body: WebhookCreate
) -> tuple[Webhook, str]:
    """A new active webhook and its secret (answered once, never again)."""
    await _ensure_writable(session, client_id)
    _check_events(client_id, list(body.events))
    url = await _check_url(settings, body.url)
    secret = new_secret()
    webhook = Webhook(
        client_id=client_id,
        url=url,
        events=list(body.events),
        description=body.description,
        secret=secret,
        created_by=audit.actor(session),
    )
    session.add(webhook)
    await session.flush()
    await session.refresh(webhook)
    audit.describe(session, target_id=str(webhook.id))
    return webhook, secret


def _in_scope(client_id: str | None) -> Any:
    return Webhook.client_id.is_(None) if client_id is None else Webhook.client_id == client_id


async def get_webhook(
    session: AsyncSession, client_id: str | None, webhook_id: uuid.UUID, *, for_update: bool = False
) -> Webhook:
    stmt = (
        select(Webhook).where(Webhook.id == webhook_id, _in_scope(client_id)).execution_options(populate_existing=True)
    )
    if for_update:
        stmt = stmt.with_for_update()
    webhook = await session.scalar(stmt)
    if webhook is None:
        raise NotFound(f"webhook {webhook_id} not found for {_scope_name(client_id)}")
    return webhook


async def list_webhooks(
    session: AsyncSession, client_id: str | None, page: PageParams, response: Response
) -> list[Webhook]:
    """Oldest first (ids are time-ordered)."""
    return await paginate(session, select(Webhook).where(_in_scope(client_id)), [Webhook.id], page, response)


async def update_webhook(
    session: AsyncSession, settings: Settings, client_id: str | None, webhook_id: uuid.UUID, body: WebhookUpdate
) -> Webhook:
    webhook = await get_webhook(session, client_id, webhook_id, for_update=True)
    await _ensure_writable(session, client_id)
    values: dict[str, Any] = {}
    if body.url is not None:
        values["url"] = await _check_url(settings, body.url)
    if body.events is not None:
        _check_events(client_id, list(body.events))
        values["events"] = list(body.events)
    if "description" in body.model_fields_set:
        values["description"] = body.description
    if body.status is not None and body.status != webhook.status:
        values["status"] = body.status
        values["disabled_reason"] = None
    if values:
        await session.execute(update(Webhook).where(Webhook.id == webhook.id).values(**values))
        if values.get("status") == "active":
            # deliveries that waited while it was disabled are due now (a wake-up at commit)
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.webhook_id == webhook.id, WebhookDelivery.status == "pending")
                .values(next_attempt_at=func.least(WebhookDelivery.next_attempt_at, func.now()))
            )
            await session.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
    return await get_webhook(session, client_id, webhook_id)


async def delete_webhook(session: AsyncSession, client_id: str | None, webhook_id: uuid.UUID) -> None:
    """The webhook and its delivery log go; nothing more is sent to it."""
    webhook = await get_webhook(session, client_id, webhook_id, for_update=True)
    await _ensure_writable(session, client_id)
    await session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id))
    await session.execute(delete(Webhook).where(Webhook.id == webhook.id))


@dataclass
class Rotated:
    secret: str
    previous_secret_expires_at: datetime


async def rotate_secret(session: AsyncSession, client_id: str | None, webhook_id: uuid.UUID) -> Rotated:
    """A new secret; the current one keeps signing too for 24 hours (both signatures are sent).
    A rotation during an overlap drops the oldest secret."""
    webhook = await get_webhook(session, client_id, webhook_id, for_update=True)
    await _ensure_writable(session, client_id)
    secret = new_secret()
    expires = await session.scalar(select(func.now() + ROTATION_OVERLAP))
    assert expires is not None
    await session.execute(
        update(Webhook)
        .where(Webhook.id == webhook.id)
        .values(secret=secret, previous_secret=webhook.secret, previous_secret_expires_at=expires)
    )
    return Rotated(secret, expires)


async def list_deliveries(
    session: AsyncSession, client_id: str | None, webhook_id: uuid.UUID, page: PageParams, response: Response
) -> list[dict[str, Any]]:
    """The webhook's delivery log, newest first."""
    webhook = await get_webhook(session, client_id, webhook_id)
    rows = await paginate(
        session,
        select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id),
        [WebhookDelivery.id],
        page,
        response,
        descending=True,
    )
    return await _with_types(session, rows)


async def _with_types(session: AsyncSession, rows: list[WebhookDelivery]) -> list[dict[str, Any]]:
    types: dict[uuid.UUID, str] = {}
    if rows:
        ids = sorted({r.event_id for r in rows})
        stmt = select(WebhookEvent.id, WebhookEvent.type).where(WebhookEvent.id.in_(ids))
        types = {row.id: row.type for row in (await session.execute(stmt)).all()}
    return [
        {
            "id": r.id,
            "event_id": r.event_id,
            "webhook_id": r.webhook_id,
            "type": types.get(r.event_id, "unknown"),
            "status": r.status,
            "attempts": r.attempts,
            "last_status_code": r.last_status_code,
            "last_error": r.last_error,
            "last_response": r.last_response,
            "created_at": r.created_at,
            "last_attempt_at": r.last_attempt_at,
            "next_attempt_at": r.next_attempt_at if r.status == "pending" else None,
            "delivered_at": r.delivered_at,
        }
        for r in rows
    ]


async def send_ping(session: AsyncSession, client_id: str | None, webhook_id: uuid.UUID) -> uuid.UUID:
    """Queue a ``ping`` event for this webhook only (delivered like any event)."""
    webhook = await get_webhook(session, client_id, webhook_id)
    await _ensure_writable(session, client_id)
    if webhook.status != "active":
        raise Unprocessable(f"webhook {webhook_id} is disabled; enable it (PATCH status active) to test it")
    event_id = await session.scalar(
        text(
            """
            WITH ev AS (
                INSERT INTO webhook_events (type, client_id, data)
                VALUES (:type, :client_id, jsonb_build_object('webhook_id', CAST(:webhook_id AS text),
                        'message', 'a test event from PIE: your endpoint is reachable and verifies signatures'))
                RETURNING id
            ), queued AS (
                INSERT INTO webhook_deliveries (event_id, webhook_id) SELECT id, CAST(:webhook_id AS uuid) FROM ev
            )
            SELECT id FROM ev
            """
        ),
        {"type": PING, "client_id": client_id, "webhook_id": str(webhook.id)},
    )
    await session.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
    audit.describe(session, event_id=str(event_id))
    assert isinstance(event_id, uuid.UUID)
    return event_id


async def recent_deliveries(
    session: AsyncSession, webhook_ids: list[uuid.UUID], per_webhook: int = 10
) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The newest ``per_webhook`` deliveries of each webhook (one query; the console's view)."""
    result: dict[uuid.UUID, list[dict[str, Any]]] = {i: [] for i in webhook_ids}
    if not webhook_ids:
        return result
    # the newest few of each webhook: an index range per webhook, not a scan of the whole log
    ids = list(
        (
            await session.scalars(
                text(
                    """
                    SELECT d.id FROM unnest(CAST(:ids AS uuid[])) AS w(id)
                    CROSS JOIN LATERAL (
                        SELECT id FROM webhook_deliveries WHERE webhook_id = w.id ORDER BY id DESC LIMIT :n
                    ) AS d
                    """
                ),
                {"ids": [str(i) for i in webhook_ids], "n": per_webhook},
            )
        ).all()
    )
    rows = list(
        (
            await session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).order_by(WebhookDelivery.id.desc())
            )
        ).all()
    )
    for entry in await _with_types(session, rows):
        result[entry["webhook_id"]].append(entry)
    return result
