"""Writing and reading the audit log and the version status history (flush, never commit)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import Response
from sqlalchemy import insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from pie.audit import context
from pie.audit.context import AuditEntry
from pie.auth import Principal
from pie.errors import Forbidden
from pie.pagination import PageParams, paginate
from pie.tables.audit import AuditRecord, VersionStatusChange


def row_values(entry: AuditEntry, *, method: str, path: str) -> dict[str, Any]:
    """The columns of the audit row of ``entry`` (besides the generated id and time)."""
    actor = entry.actor or {}
    return {
        "action": entry.action,
        "method": method,
        "path": path,
        "target_type": entry.target_type or "other",
        "target_id": entry.target_id,
        "client_id": entry.client_id,
        "request_id": entry.request_id,
        "actor_sub": actor.get("sub"),
        "actor_username": actor.get("username"),
        "actor_client_id": actor.get("client_id"),
        "summary": entry.summary,
    }


async def record(session: AsyncSession, entry: AuditEntry, *, method: str, path: str) -> None:
    """One INSERT, no RETURNING, in the caller's transaction."""
    await session.execute(insert(AuditRecord).values(**row_values(entry, method=method, path=path)))


async def list_audit(
    session: AsyncSession,
    principal: Principal,
    page: PageParams,
    response: Response,
    *,
    client_id: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    after: datetime | None = None,
    before: datetime | None = None,
) -> list[AuditRecord]:
    """Newest first. Admins see every row; any other caller the rows of the tenants it may
    access (403 for a caller without any tenant)."""
    stmt = select(AuditRecord)
    if client_id is not None:
        principal.require_tenant(client_id)
        stmt = stmt.where(AuditRecord.client_id == client_id)
    elif not principal.is_admin:
        if not principal.tenants:
            raise Forbidden("reading the audit log needs admin or access to a client")
        stmt = stmt.where(AuditRecord.client_id.in_(sorted(principal.tenants)))
    if target_type is not None:
        stmt = stmt.where(AuditRecord.target_type == target_type)
    if target_id is not None:
        stmt = stmt.where(AuditRecord.target_id == target_id)
    if actor is not None:
        stmt = stmt.where(
            or_(
                AuditRecord.actor_sub == actor,
                AuditRecord.actor_username == actor,
                AuditRecord.actor_client_id == actor,
            )
        )
    if action is not None:
        stmt = stmt.where(AuditRecord.action == action)
    if after is not None:
        stmt = stmt.where(AuditRecord.occurred_at >= after)
    if before is not None:
        stmt = stmt.where(AuditRecord.occurred_at < before)
    return await paginate(session, stmt, [AuditRecord.id], page, response, descending=True)


async def record_status_change(
    session: AsyncSession, model_id: str, version: str, from_status: str | None, to_status: str
) -> None:
    """One row of the version's status history, by the current actor (None: the platform)."""
    await session.execute(
        insert(VersionStatusChange).values(
            model_id=model_id,
            version=version,
            from_status=from_status,
            to_status=to_status,
            changed_by=context.actor(session),
        )
    )


async def list_status_history(
    session: AsyncSession, model_id: str, version: str, page: PageParams, response: Response
) -> list[VersionStatusChange]:
    """Oldest first (the caller checked the version exists)."""
    stmt = select(VersionStatusChange).where(
        VersionStatusChange.model_id == model_id, VersionStatusChange.version == version
    )
    return await paginate(session, stmt, [VersionStatusChange.id], page, response)
