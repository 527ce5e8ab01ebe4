"""Request and response bodies of domains, features and services (spec 5)."""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from pie.audit.schemas import CREATED_BY, Actor
from pie.errors import error_response_doc
from pie.jsonbody import StoredJson, StoredList, StoredObject
from pie.schemas import Identifier, Name, RequestBody, ResponseBody, UtcDatetime


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity (Python's parser accepts them); refuse them as bad input."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (NaN and Infinity are not JSON)")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def _datetime_string(value: Any) -> Any:
    """An ISO-8601 date-time string (not a Unix timestamp, which pydantic's lax mode would take
    from a numeric string)."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO-8601 date-time string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO-8601 date-time string") from None


def _as_utc(value: datetime | None) -> datetime | None:
    """A date-time without an offset is taken as UTC; the UTC instant must lie within years
    1-9999 (what a stored timestamp can be read back as)."""
    if value is None:
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("date-time out of range (the UTC instant must lie within years 1-9999)") from None


JsonObject = Annotated[dict[str, Any], AfterValidator(_finite)]
JsonList = Annotated[list[Any], AfterValidator(_finite)]
# ISO-8601 string in, aware UTC datetime out (RequestBody is strict; JSON has no datetime type)
InputDatetime = Annotated[datetime, BeforeValidator(_datetime_string), Field(strict=False), AfterValidator(_as_utc)]


# -- domains -------------------------------------------------------------------------------------


class DomainCreate(RequestBody):
    domain_id: Identifier | None = Field(default=None, description="generated (UUIDv7) when omitted")
    name: Name | None = None
    features: JsonList | None = Field(default=None, description="live feature definitions (spec 5.2)")


class DomainUpdate(RequestBody):
    name: Name | None = None
    status: Literal["active", "inactive"] | None = None


class DomainOut(ResponseBody):
    client_id: str
    domain_id: str
    name: str | None
    status: str
    features: StoredList
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    updated_at: UtcDatetime


class FeaturesUpdate(RequestBody):
    features: JsonList


class FeaturesOut(ResponseBody):
    features: StoredList


class ContractOut(ResponseBody):
    """The feature schema in force for the domain's services (spec 15.1): the one init, service
    update, batch re-init and the freeze check use."""

    features: StoredList = Field(description="the governing feature definitions")
    source: Literal["model_version", "domain_snapshot"] = Field(
        description="`model_version`: the frozen schema of the default version; `domain_snapshot`: a copy of "
        "the domain's live features taken when the active default revision was written"
    )
    model_id: str
    model_version: str
    assignment_id: uuid.UUID = Field(description="the active `default` revision that holds the snapshot")


# -- services ------------------------------------------------------------------------------------


class ServiceInit(RequestBody):
    service_id: Identifier
    departure_datetime: InputDatetime | None = None
    static_features: JsonObject = Field(default_factory=dict)


class ServiceUpdate(RequestBody):
    departure_datetime: InputDatetime | None = Field(
        default=None, description="replaced when given; an explicit null clears it"
    )
    static_features: JsonObject = Field(
        default_factory=dict, description="shallow-merged into provided_features; a null value removes the key"
    )


class ServiceOut(ResponseBody):
    domain_id: str
    service_id: str
    status: str
    departure_datetime: UtcDatetime | None
    departed: bool
    provided_features: StoredObject
    resolved_features: StoredObject
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    updated_at: UtcDatetime


class ServiceUpdated(ServiceOut):
    undefined_features: list[str] = Field(
        default_factory=list,
        description="keys of provided_features that the governing schema no longer defines (a feature "
        "dropped by a newer default version): kept, not resolved, not an error",
    )


class ServiceInitOut(ResponseBody):
    service_id: str
    job_id: str


class BatchInitJob(ResponseBody):
    service_id: str
    job_id: str


class BatchInitOut(ResponseBody):
    dispatched_services: list[str]
    jobs: list[BatchInitJob] = Field(description="the job each service got, in service order")


# -- documented error bodies -----------------------------------------------------------------------


class ErrorEnvelope(ResponseBody):
    """The standard error envelope (the app's ``ErrorEnvelope`` component)."""

    success: bool = False
    message: str = Field(description="human-readable, never parsed by callers")


class BlockingService(ResponseBody):
    service_id: str
    feature: str
    value: StoredJson = Field(description="the stored (patched) value; null when a mandatory feature is missing")
    reason: str


class AssignmentBlockedOut(ResponseBody):
    """A domain assignment upsert blocked by services' provided features (spec 6.3)."""

    error: str
    blocking_services: list[BlockingService]


class FeaturesDryRunOut(ResponseBody):
    """``PUT .../features?dry_run=true`` (spec 15.1): nothing was written."""

    features: StoredList = Field(description="the submitted definitions, as they would be stored")
    dry_run: Literal[True] = True
    blocking_services: list[BlockingService] = Field(
        description="one entry per (non-departed service, feature) whose stored provided_features would not "
        "resolve against the submitted features (as in a blocked assignment, spec 6.3); empty when none"
    )


_MEANINGS = {
    400: "malformed JSON, wrong types, missing fields or bad path parameters",
    404: "the client, domain, service or assignment key does not exist in this scope",
    409: "it already exists",
    422: "semantically invalid: client suspended, domain not active, no model assigned, invalid features, "
    "invalid model reference, archived assignment, input failing the handler contract (see the message)",
}


def error_responses(*statuses: int, blocked: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's documented errors (401/403 are added app-wide)."""
    responses: dict[int | str, dict[str, Any]] = {status: error_response_doc(_MEANINGS[status]) for status in statuses}
    if blocked:
        responses[422] = {
            "model": AssignmentBlockedOut | ErrorEnvelope,
            "description": "blocked by services: `{error, blocking_services}` (spec 6.3); any other "
            "semantic failure: the standard envelope. " + _MEANINGS[422],
        }
    return responses
