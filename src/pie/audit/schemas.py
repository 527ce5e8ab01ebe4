"""Answers of the audit routes and the actor object shown as ``created_by``."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pie.schemas import ResponseBody, UtcDatetime


class Actor(ResponseBody):
    """Who made a write, from the verified token: ``sub`` always; ``username`` for a human
    (user pool) token; ``client_id`` — the app client — for a machine (client-credentials)
    token. As ``created_by``: null for rows written before the audit trail existed and for
    rows the platform wrote on its own (jobs the dispatcher creates)."""

    sub: str | None = Field(description="the token's `sub` claim")
    username: str | None = Field(default=None, description="humans: the token's `username` claim")
    client_id: str | None = Field(default=None, description="machine tokens: the app client id (`client_id` claim)")


class AuditRecordOut(ResponseBody):
    id: int = Field(description="position in the log (ascending with time)")
    occurred_at: UtcDatetime = Field(description="the transaction time of the write")
    action: str = Field(description="the OpenAPI operation id of the write")
    method: str
    path: str
    target_type: str = Field(
        description="client | domain | service | assignment | model | model_version | subscription | job | webhook"
    )
    target_id: str | None = Field(
        description="client, domain and model ids as such; service `domain/service`; assignment "
        "`domain/key` or `domain/service/key`; model version `model/version`; job and subscription ids"
    )
    client_id: str | None = Field(description="the tenant; null for platform writes (models, versions, ...)")
    request_id: str | None = Field(description="the request's `X-Request-ID`")
    actor: Actor
    summary: dict[str, Any] = Field(
        description="what changed, compactly: the body's scalar fields, the names of its object/array "
        "fields (`fields`), and facts the server adds (e.g. `from`/`to` of a status change)"
    )


class StatusChangeOut(ResponseBody):
    from_status: str | None = Field(description="null for no earlier status")
    to_status: str
    changed_by: Actor | None = Field(description="null when the platform made the change")
    changed_at: UtcDatetime


CREATED_BY = Field(
    default=None,
    description="who wrote the record (`{sub, username, client_id}`, see Actor); null for records "
    "from before the audit trail and for records the platform wrote on its own",
)
