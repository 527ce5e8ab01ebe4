from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, computed_field

from pie.audit.schemas import CREATED_BY, Actor
from pie.jsonbody import StoredJson, StoredList
from pie.schemas import RequestBody, ResponseBody, UtcDatetime

JobStatus = Literal["pending", "started", "success", "failure"]


class DispatchFailure(ResponseBody):
    code: str
    message: str


class JobDispatch(ResponseBody):
    """How the job's dispatch went when an attempt failed and was retried (spec 15.3)."""

    attempts: int = Field(description="dispatch attempts so far (the job's `attempts`)")
    last_error: DispatchFailure = Field(description="the latest failed attempt that was retried")
    next_attempt_at: UtcDatetime | None = Field(
        description="when the next attempt is due, while the job is `pending`; null otherwise"
    )


def _dispatch_failure(stored: Any) -> DispatchFailure:
    if isinstance(stored, dict):
        return DispatchFailure(
            code=str(stored.get("code") or "dispatch_failed"), message=str(stored.get("message") or "")
        )
    return DispatchFailure(code="dispatch_failed", message=str(stored))


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
    arm: Literal["primary", "split", "shadow"] | None = Field(
        default=None,
        description="the experiment arm of a job launched through an assignment key (spec 15.7); null for "
        "jobs not launched through a key (direct inference, subscriptions without a key) and for jobs "
        "older than experiments",
    )
    shadow_of: str | None = Field(default=None, description="a shadow job: the job it copies")
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
    # what ``dispatch`` is derived from (read with the row, not shown)
    dispatch_error: Any = Field(default=None, exclude=True)
    next_attempt_at: datetime | None = Field(default=None, exclude=True)

    @computed_field(  # type: ignore[prop-decorator]  # pydantic's documented computed_field-over-property form
        description="null until a dispatch attempt fails and is retried; then the attempts, the latest "
        "retried failure and, while the job is `pending`, when the next attempt is due. `error` is set only "
        "when the job ends in `failure`"
    )
    @property
    def dispatch(self) -> JobDispatch | None:
        if self.dispatch_error is None:
            return None
        return JobDispatch(
            attempts=self.attempts,
            last_error=_dispatch_failure(self.dispatch_error),
            next_attempt_at=self.next_attempt_at if self.status == "pending" else None,
        )


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
