"""Request and response bodies of the model registry (spec 7 and 8).

Shapes and JSON types are checked here (a failure is 400); meaning is checked in the logic
modules (422): ARNs, ECS targets, in-process names, schemas, feature definitions.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, model_serializer

from pie.audit.schemas import CREATED_BY, Actor
from pie.errors import error_response_doc
from pie.jsonbody import StoredList, StoredObject
from pie.schemas import Description, Identifier, Name, RequestBody, ResponseBody, UtcDatetime

VersionStatus = Literal["pending", "training", "active", "failed", "archived"]
TriggerEvent = Literal["training_complete", "inference_complete"]
TargetAction = Literal["inference", "training"]
InputSource = Literal["stored", "trigger_output"]
JsonSchema = dict[str, Any] | bool


# at most a week: an ECS task has no hard limit, a Lambda function at most 15 minutes
MAX_HANDLER_TIMEOUT_SECONDS = 7 * 24 * 3600
TimeoutSeconds = Annotated[
    float | None,
    Field(
        default=None,
        gt=0,
        le=MAX_HANDLER_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="seconds a started job of this handler may run before it fails as timed out "
        "(overrides PIE_JOB_TIMEOUT_SECONDS; the callback token expires after it plus a margin)",
        examples=[900],
    ),
]


class LambdaHandler(RequestBody):
    type: Literal["lambda"]
    timeout_seconds: TimeoutSeconds
    arn: str = Field(
        description="Lambda function ARN", examples=["arn:aws:lambda:us-west-2:123456789012:function:infer"]
    )
    version: str | None = Field(default=None, description="version or alias qualifier")


class EcsTaskHandler(RequestBody):
    type: Literal["ecs_task"]
    timeout_seconds: TimeoutSeconds
    value: str = Field(
        description="<cluster>/<task_definition>: the cluster short name (no '/') and the task family "
        "(optionally family:revision)",
        examples=["pricing/train-task:3"],
    )
    container: str | None = Field(
        default=None,
        description="the container of the task definition whose environment receives the job payload "
        "(default PIE_ECS_CONTAINER_NAME)",
        examples=["trainer"],
    )


class InProcessHandler(RequestBody):
    type: Literal["in_process"]
    timeout_seconds: TimeoutSeconds
    value: str = Field(description="a registered in-process implementation (GET /v2/handlers/in-process)")


Handler = Annotated[LambdaHandler | EcsTaskHandler | InProcessHandler, Field(discriminator="type")]


class Handlers(RequestBody):
    training: Handler
    inference: Handler


class HandlerContract(RequestBody):
    input_schema: JsonSchema | None = Field(default=None, description="Draft 2020-12 schema of the input")
    output_schema: JsonSchema | None = Field(default=None, description="Draft 2020-12 schema of the output")


class HandlerContracts(RequestBody):
    training: HandlerContract | None = None
    inference: HandlerContract | None = None


class ModelWrite(RequestBody):
    name: Name = Field(min_length=1)
    description: Description
    handlers: Handlers
    handler_contracts: HandlerContracts | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    def handlers_json(self) -> dict[str, Any]:
        return self.handlers.model_dump(exclude_none=True)

    def contracts_json(self) -> dict[str, Any] | None:
        """The contracts with only the schemas given; None when there is no schema at all (a
        model "without contracts", whose handlers drive staleness)."""
        if self.handler_contracts is None:
            return None
        dumped = self.handler_contracts.model_dump(exclude_none=True)
        return {action: contract for action, contract in dumped.items() if contract} or None


class ModelCreate(ModelWrite):
    id: Identifier | None = Field(default=None, description="generated (UUIDv7) when omitted")


class ModelUpdate(ModelWrite):
    pass


class VersionCreate(RequestBody):
    version: Identifier | None = Field(default=None, description="the next free integer when omitted")
    description: Description = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    # items are checked as feature definitions (422 naming the culprit), as for a domain's features
    features: list[Any] | None = Field(default=None, description="the frozen feature schema")


class VersionStatusUpdate(RequestBody):
    status: VersionStatus


class InferenceRequest(RequestBody):
    input: dict[str, Any]
    subscribe: bool = False
    client_id: Identifier | None = Field(
        default=None,
        description="the tenant the job belongs to, for callers with several tenants and admins (403 when the "
        "caller cannot access it); by default the caller's only tenant, else none (a platform job)",
    )


class SubscriptionCreate(RequestBody):
    trigger_event: TriggerEvent
    target_model_id: Identifier
    target_action: TargetAction
    input_source: InputSource
    input: dict[str, Any] | None = None
    label: Name | None = None
    status: Literal["active", "paused"] = "active"


class SubscriptionUpdate(RequestBody):
    input: dict[str, Any] | None = None
    label: Name | None = None
    # not nullable and never `stale` (the server's verdict, lifted by setting `active`): omit the
    # field to keep the current status
    status: Literal["active", "paused"] = Field(
        default=None,  # type: ignore[arg-type]  # absent = unchanged; an explicit null is a 400
        description="`active` or `paused`; omit to keep the current status (`stale` is set by the server; "
        "`active` re-activates a stale subscription)",
    )


# ---- responses -------------------------------------------------------------------------------


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meanings = {
        400: "malformed JSON, wrong types, missing fields or bad path parameters",
        401: "missing, malformed or rejected bearer token",
        403: "the token lacks the operation permission",
        404: "the model, version or subscription does not exist",
        409: "it already exists",
        422: "semantically invalid (see the message)",
    }
    return {status: error_response_doc(meanings[status]) for status in statuses}


_metadata = Field(validation_alias=AliasChoices("metadata_", "metadata"))


class ModelOut(ResponseBody):
    id: str
    name: str
    description: str
    handlers: StoredObject
    handler_contracts: StoredObject | None
    metadata: StoredObject = _metadata
    status: str
    created_at: UtcDatetime
    updated_at: UtcDatetime


class VersionOut(ResponseBody):
    model_id: str
    version: str
    description: str
    metadata: StoredObject = _metadata
    status: VersionStatus
    handlers: StoredObject
    handler_contracts: StoredObject | None
    features: StoredList | None
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    updated_at: UtcDatetime


class ModelUpdated(ModelOut):
    new_version: VersionOut | None = Field(
        default=None, description="the pending version generated because the model is active (null otherwise)"
    )
    versions_keeping_old_handlers: list[str] = Field(
        default_factory=list,
        description="when this update changed handlers or handler_contracts of an active model: the existing "
        "versions (by creation) that keep the previous ones (versions snapshot them when created); empty "
        "otherwise",
    )
    updated_versions: list[str] = Field(
        default_factory=list,
        description="when this update changed handlers or handler_contracts of a pending model (no version "
        "ever active): its versions (by creation), which took the new ones in place; empty otherwise",
    )
    stale_subscriptions: list[str] = Field(
        default_factory=list, description="ids of the event subscriptions this update turned `stale`"
    )


class ModelAndVersion(BaseModel):
    model: ModelOut
    version: VersionOut


class TriggeredEvent(BaseModel):
    """One firing: ``job_id`` when the target action was triggered, ``error`` when it was not."""

    subscription_id: str
    job_id: str | None = Field(default=None, description="present when the target action was triggered")
    error: str | None = Field(default=None, description="present when the target action failed to trigger")

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class AssignmentRef(BaseModel):
    client_id: str
    domain_id: str
    service_id: str | None = Field(description="null for a domain-scope revision")
    assignment_key: str


class VersionInUseOut(BaseModel):
    """409 of archiving a version that active assignment revisions point at (spec 15.4)."""

    success: Literal[False] = False
    message: str
    assignments: list[AssignmentRef] = Field(description="the active revisions pointing at the version")


class VersionStatusChanged(ModelAndVersion):
    triggered_events: list[TriggeredEvent]


class InferenceStarted(BaseModel):
    inference_job_id: str


class SubscriptionOut(ResponseBody):
    id: uuid.UUID
    source_model_id: str
    trigger_event: str
    target_model_id: str
    target_action: str
    input_source: str
    input: StoredObject | None
    label: str | None
    status: Literal["active", "paused", "stale"]
    warnings: list[str]
    # set on replay subscriptions (``subscribe: true`` on an assignment job): the replay re-runs
    # through this assignment key in this scope
    client_id: str | None = None
    domain_id: str | None = None
    service_id: str | None = None
    assignment_key: str | None = None
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    updated_at: UtcDatetime
