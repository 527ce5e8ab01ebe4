"""The hot paths of jobs (docs/architecture.md: Fast paths): ``getjob``'s reader for the fast
layer (``pie.http.fast``) and the one launch statement of a direct inference job.

``LAUNCH`` is built from the tables: the job row (``Job.__table__``), its audit row
(``AuditRecord.__table__``, the columns of ``pie.audit.logic.row_values``) and the dispatchers'
``pg_notify`` (``NOTIFY_CHANNEL``) in one statement, one round trip. The route's
no-subscription case (``pie.registry.logic.run_inference``) runs it through its session, the
fast write layer on its own connection, with the same parameters (``launch_params``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import cast, func, insert, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import bindparam

from pie import metrics, policies
from pie.audit.context import AuditEntry
from pie.audit.logic import row_values
from pie.audit.models import AuditRecord
from pie.auth import Principal
from pie.config import get_settings
from pie.errors import Unprocessable
from pie.http.fast import HotRead, ReadAnswer
from pie.jobs import logic
from pie.jobs.logic import NOTIFY_CHANNEL, read_job
from pie.jobs.models import Job
from pie.jobs.schemas import JobOut

_JOBS = Job.__table__.c
_AUDIT = AuditRecord.__table__.c
# the job columns a direct inference job is launched with (the others take their defaults, as
# in ``create_job``); JSON values are bound as ``psycopg`` ``Jsonb`` (serialized once)
_JOB_VALUES = (
    "job_type",
    "model_id",
    "model_version",
    "input",
    "client_id",
    "warnings",
    "timeout_seconds",
    "created_by",
)
_AUDIT_VALUES = tuple(c for c in row_values(AuditEntry(action="", actor=None), method="", path="") if c != "target_id")


def _bind(column: Any, name: str) -> Any:
    if isinstance(column.type, JSONB):
        return cast(bindparam(name), JSONB)
    return bindparam(name, type_=column.type)


def _launch() -> Any:
    job = (
        insert(Job).values({name: _bind(_JOBS[name], name) for name in _JOB_VALUES}).returning(_JOBS.job_id).cte("job")
    )
    audit_row = select(
        *(_bind(_AUDIT[name], f"audit_{name}").label(name) for name in _AUDIT_VALUES),
        job.c.job_id.label("target_id"),
    )
    audit = insert(AuditRecord).from_select([*_AUDIT_VALUES, "target_id"], audit_row).cte("audit")
    return select(job.c.job_id, func.pg_notify(literal(NOTIFY_CHANNEL), literal(""))).add_cte(audit)


LAUNCH = _launch()


def launch_params(
    *,
    model_id: str,
    version: str,
    input_json: bytes,
    client_id: str | None,
    timeout_seconds: float | None,
    entry: AuditEntry,
    method: str,
    path: str,
) -> dict[str, Any]:
    """The parameters of ``LAUNCH``: an inference job of ``model_id``/``version`` with the
    input already serialized, in the tenant ``client_id``, and the audit row of ``entry``
    (its target: the new job)."""
    params: dict[str, Any] = {
        "job_type": "inference",
        "model_id": model_id,
        "model_version": version,
        "input": Jsonb(input_json, dumps=_as_is),
        "client_id": client_id,
        "warnings": Jsonb([]),
        "timeout_seconds": timeout_seconds,
        "created_by": Jsonb(entry.actor),
    }
    audit = row_values(entry, method=method, path=path)
    for name in _AUDIT_VALUES:
        value = audit[name]
        params[f"audit_{name}"] = Jsonb(value) if isinstance(_AUDIT[name].type, JSONB) else value
    return params


def _as_is(data: bytes) -> bytes:
    return data


def payload_problem(
    handler: dict[str, Any] | None, *, model_id: str, version: str, input: dict[str, Any], client_id: str | None
) -> str | None:
    """``create_job``'s payload check of an inference job (same settings: ``get_settings()``)."""
    return logic.payload_problem(
        get_settings(),
        handler,
        job_type="inference",
        model_id=model_id,
        model_version=version,
        input=input,
        client_id=client_id,
    )


async def launch_inference(
    session: AsyncSession,
    entry: AuditEntry,
    *,
    model_id: str,
    version: str,
    input: dict[str, Any],
    client_id: str | None,
    handler: dict[str, Any] | None,
    method: str,
    path: str,
) -> str:
    """``LAUNCH`` in the session's transaction: the job, the audit row of ``entry`` (marked
    recorded: ``pie.audit.routing`` writes no second row) and the NOTIFY; the job's id. 422
    when the payload is over its handler's limit (nothing written)."""
    problem = payload_problem(handler, model_id=model_id, version=version, input=input, client_id=client_id)
    if problem is not None:
        raise Unprocessable(problem)
    if client_id is not None:
        entry.client_id = client_id
    params = launch_params(
        model_id=model_id,
        version=version,
        input_json=json.dumps(input).encode(),
        client_id=client_id,
        timeout_seconds=(handler or {}).get("timeout_seconds"),
        entry=entry,
        method=method,
        path=path,
    )
    job_id = str((await session.execute(LAUNCH, params)).scalar_one())
    entry.target_id = job_id
    entry.recorded = True
    metrics.on_commit(session, metrics.jobs_created(["inference"]))
    return job_id


async def get_job(principal: Principal | None, params: Mapping[str, str]) -> ReadAnswer:
    """``getjob``: the route's read (``read_job``: 404 / 403 raise, the route answers them)."""
    assert principal is not None  # an authenticated read: the layer verified the token
    if not policies.may_read_jobs(principal):
        return None
    return JobOut, await read_job(principal, params["job_id"])


HOT_READS = {"getjob": HotRead(get_job)}
