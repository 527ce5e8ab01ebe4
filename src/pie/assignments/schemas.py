"""Request and response bodies of assignments and assignment jobs (spec 6, 9.1)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import AliasChoices, Field

from pie.audit.schemas import CREATED_BY, Actor
from pie.jsonbody import StoredObject
from pie.schemas import AssignmentKey, Identifier, RequestBody, ResponseBody, UtcDatetime
from pie.tenancy.schemas import JsonObject


class ServiceUpdateEntry(RequestBody):
    """Patch of one service's ``provided_features`` during a domain ``default`` upsert."""

    service_id: Identifier
    static_features: JsonObject


class SplitEntry(RequestBody):
    """A split arm (spec 15.7): this version takes ``percent`` of the launches through the key."""

    model_id: Identifier
    model_version: Identifier
    percent: int = Field(description="an integer 1-99; all split arms together below 100 (422 otherwise)")


class ShadowEntry(RequestBody):
    """A shadow version (spec 15.7): it gets a copy of every launch through the key."""

    model_id: Identifier
    model_version: Identifier


class SplitOut(ResponseBody):
    model_id: str
    model_version: str
    percent: int


class ShadowOut(ResponseBody):
    model_id: str
    model_version: str


class AssignmentUpsert(RequestBody):
    """Body of the keyed PUT routes."""

    model_id: Identifier
    model_version: Identifier
    status: Literal["active", "archived"] = "active"
    role: str | None = None
    settings: JsonObject = Field(default_factory=dict)
    metadata: JsonObject = Field(default_factory=dict)
    service_updates: list[ServiceUpdateEntry] | None = Field(
        default=None, description="domain `default` assignment upserts only"
    )
    split: list[SplitEntry] = Field(
        default_factory=list,
        description="an experiment (spec 15.7): versions that take a share of the launches; the primary "
        "model_id/model_version takes the rest. Write the key again without it to end the experiment",
    )
    shadow: list[ShadowEntry] = Field(
        default_factory=list, description="versions that get a shadow copy of every launch (spec 15.7)"
    )


class AssignmentCreate(AssignmentUpsert):
    """Body of the collection POST routes: the key travels in the body."""

    assignment_key: AssignmentKey


class AssignmentOut(ResponseBody):
    assignment_id: uuid.UUID
    client_id: str
    domain_id: str
    service_id: str | None
    assignment_key: str
    model_id: str
    model_version: str
    status: str
    role: str | None
    settings: StoredObject
    metadata: StoredObject = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    split: list[SplitOut] = Field(default_factory=list, description="the split arms, as stored (spec 15.7)")
    shadow: list[ShadowOut] = Field(default_factory=list, description="the shadow versions, as stored (spec 15.7)")
    created_by: Actor | None = CREATED_BY
    created_at: UtcDatetime
    updated_at: UtcDatetime


class AssignmentJobRequest(RequestBody):
    job_type: Literal["inference", "training"] = "inference"
    input: JsonObject = Field(default_factory=dict, description="payload forwarded to the model handler")
    subscribe: bool = Field(
        default=False,
        description="inference only: store this input as a replay subscription that re-runs through "
        "the same assignment key after the model is retrained",
    )


class JobStarted(ResponseBody):
    job_id: str


class AssignmentPreview(AssignmentOut):
    """The revision a dry run would insert: no id, no timestamps, no author (it does not exist)."""

    assignment_id: None = None  # type: ignore[assignment]
    service_id: None = None
    created_by: None = None
    created_at: None = None  # type: ignore[assignment]
    updated_at: None = None  # type: ignore[assignment]


class AssignmentDryRun(ResponseBody):
    """``?dry_run=true`` (spec 14.7): what the upsert would do; nothing was written."""

    dry_run: Literal[True] = True
    revision: AssignmentPreview
    services_checked: int = Field(
        description="non-departed services the freeze check covered (0 for an archived revision)"
    )
    services_re_resolved: int = Field(
        description="services whose resolved_features the upsert would rewrite (`default` key only; "
        "patched services count)"
    )


class ArmOut(ResponseBody):
    """One arm of the active revision and the jobs it ran (spec 15.7)."""

    arm: Literal["primary", "split", "shadow"]
    model_id: str
    model_version: str
    percent: int | None = Field(description="the arm's share of the launches (the primary: the rest); null for shadows")
    jobs: int = Field(description="jobs of this arm launched through the revision")
    pending: int
    started: int
    success: int
    failure: int


class AssignmentArms(ResponseBody):
    """``GET .../assignments/{key}/arms``: the experiment of the key's active revision."""

    assignment_id: uuid.UUID
    assignment_key: str
    arms: list[ArmOut]
