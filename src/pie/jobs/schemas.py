from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field

from pie.audit.schemas import CREATED_BY, Actor
from pie.jsonbody import StoredJson, StoredList
from pie.schemas import RequestBody, ResponseBody, UtcDatetime

JobStatus = Literal["pending", "started", "success", "failure"]


class JobOut(ResponseBody):
    job_id: str
    job_type: Literal["inference", "training"]
    status: JobStatus
    model_id: str
    model_version: str
    assignment_id: uuid.UUID | None = None
    client_id: str | None = None
    domain_id: str | None = None
    service_id: str | None = None
    subscription_id: uuid.UUID | None = None
    retry_of: str | None = Field(default=None, description="the job this one re-runs (POST /v2/jobs/{job_id}/retry)")
    input: StoredJson = None
    output: StoredJson = None
    error: StoredJson = None
    warnings: StoredList = Field(default_factory=list)
    attempts: int
    timeout_seconds: float | None = Field(
        default=None, description="the handler's time-out in seconds; null: the global PIE_JOB_TIMEOUT_SECONDS applies"
    )
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    completed_at: UtcDatetime | None = None
    updated_at: UtcDatetime


class JobCompletion(RequestBody):
    """What a handler reports when it ends: ``output`` is kept on success, ``error`` on failure."""

    status: Literal["success", "failure"]
    output: Any = None
    error: Any = None


class CompletionConflictOut(ResponseBody):
    """409 of a completion: the job already ended with the other status, or it was cancelled."""

    success: Literal[False] = False
    message: str
    cancelled: bool | None = Field(
        default=None,
        description="true when the job was cancelled (POST /v2/jobs/{job_id}/cancel): every report of it is "
        "ignored; absent otherwise",
    )


class CompletionOut(ResponseBody):
    job_id: str
    model_id: str
    model_version: str
    status: str
    triggered_events: list[dict[str, Any]] = Field(default_factory=list)
