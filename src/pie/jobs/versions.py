"""The model version a job runs on: its lookup (a 404 naming the missing model or version; the
locks a status change or a launch takes) and the statuses that take no job. Below the packages
that launch jobs (``registry``, ``tenancy``, ``assignments``, ``lifecycle``), so each of them
reads versions the same way without importing another.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pie.errors import NotFound
from pie.tables.registry import Model, ModelVersion

UNUSABLE = frozenset({"failed", "archived"})


def unusable(status: str) -> str:
    """``has failed`` / ``is archived``: why a version in an ``UNUSABLE`` status takes no job."""
    return "has failed" if status == "failed" else f"is {status}"


async def ensure_model_exists(session: AsyncSession, model_id: str) -> None:
    if await session.scalar(select(Model.id).where(Model.id == model_id)) is None:
        raise NotFound(f"model {model_id} not found")


async def get_model_version(
    session: AsyncSession, model_id: str, version: str, *, for_update: bool = False, for_share: bool = False
) -> ModelVersion:
    """The version (404 when the model or the version is missing). ``for_update`` locks the row
    with ``FOR NO KEY UPDATE`` (blocks other status changes, not foreign-key checks);
    ``for_share`` with ``FOR SHARE`` (a job launch: no status change can commit between the
    check of the version's status and the job's commit)."""
    stmt = (
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id, ModelVersion.version == version)
        .execution_options(populate_existing=True)
    )
    if for_update:
        stmt = stmt.with_for_update(key_share=True)
    elif for_share:
        stmt = stmt.with_for_update(read=True)
    found = await session.scalar(stmt)
    if found is None:
        await ensure_model_exists(session, model_id)
        raise NotFound(f"model {model_id} has no version {version}")
    return found
