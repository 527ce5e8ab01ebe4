"""Experiments on an assignment key (spec 15.7): which arm a launch takes, and its shadow copies.

A revision may carry ``split`` (``[{model_id, model_version, percent}]``) and ``shadow``
(``[{model_id, model_version}]``). A launch through the key picks one arm:

* with a service: bucket = ``int(md5(f"{assignment_id}:{service_id}").hexdigest()[:8], 16) % 100``
  — in SQL ``('x' || substr(md5(assignment_id::text || ':' || service_id), 1, 8))::bit(32)::bigint % 100``
  (both read the first 32 bits of the digest as an unsigned integer), so a service stays on one
  arm for the revision's life and an analyst can recompute it (docs/experiments.md);
* without a service: a bucket drawn at random.

The split arms take consecutive bucket ranges in their listed order (the first ``percent[0]``
buckets, then the next ``percent[1]`` ...); the primary takes the rest. Each shadow version then
gets a copy of the launch (``arm = 'shadow'``, ``shadow_of`` = the job it copies), which never
changes a service's status and fires nothing (``pie.jobs.logic.finish_jobs``,
``pie.webhooks.outbox``).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, case, cast, func, literal
from sqlalchemy.dialects.postgresql import BIT
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ColumnElement

from pie.errors import Unprocessable
from pie.jobs.logic import create_job
from pie.jobs.versions import UNUSABLE, get_model_version, unusable
from pie.jsonschemas import input_problem as contract_input_problem
from pie.tables.assignments import Assignment
from pie.tables.jobs import Job
from pie.tables.registry import ModelVersion

PRIMARY, SPLIT, SHADOW = "primary", "split", "shadow"
ARMS = (PRIMARY, SPLIT, SHADOW)
BUCKETS = 100


@dataclass(frozen=True)
class Arm:
    arm: str  # primary | split | shadow
    model_id: str
    model_version: str
    percent: int | None = None  # split arms: their share; the primary: the rest; shadows: None


def arms_of(revision: Any) -> list[Arm]:
    """Every arm of a revision (an ``Assignment`` or a mapping with its fields): the primary
    (with the share it keeps), the split arms in listed order, then the shadows."""

    def get(name: str) -> Any:
        return revision.get(name) if isinstance(revision, dict) else getattr(revision, name)

    split = list(get("split") or [])
    shadow = list(get("shadow") or [])
    rest = BUCKETS - sum(int(e["percent"]) for e in split)
    return [
        Arm(PRIMARY, get("model_id"), get("model_version"), rest),
        *(Arm(SPLIT, e["model_id"], e["model_version"], int(e["percent"])) for e in split),
        *(Arm(SHADOW, e["model_id"], e["model_version"]) for e in shadow),
    ]


def bucket(assignment_id: uuid.UUID | str, service_id: str) -> int:
    """The service's bucket (0-99) on this revision: the first 32 bits of
    ``md5("{assignment_id}:{service_id}")`` as an unsigned integer, modulo 100."""
    digest = hashlib.md5(f"{assignment_id}:{service_id}".encode(), usedforsecurity=False).hexdigest()
    return int(digest[:8], 16) % BUCKETS


def arm_for_bucket(revision: Assignment, value: int) -> Arm:
    edge = 0
    for entry in revision.split or []:
        edge += int(entry["percent"])
        if value < edge:
            return Arm(SPLIT, entry["model_id"], entry["model_version"], int(entry["percent"]))
    return Arm(PRIMARY, revision.model_id, revision.model_version)


def choose(revision: Assignment, service_id: str | None) -> Arm:
    """The arm of a launch: by the service's bucket, or at random by weight without a service."""
    if not revision.split:
        return Arm(PRIMARY, revision.model_id, revision.model_version)
    value = bucket(revision.assignment_id, service_id) if service_id is not None else random.randrange(BUCKETS)
    return arm_for_bucket(revision, value)


def bucket_sql(assignment_id: uuid.UUID, service_id: Any) -> ColumnElement[int]:
    """``bucket`` in SQL, for set-based launches: ``('x' || substr(md5('<assignment_id>:' ||
    service_id), 1, 8))::bit(32)::bigint % 100``."""
    digest = func.md5(literal(f"{assignment_id}:") + service_id)
    return cast(cast(literal("x") + func.substr(digest, 1, 8), BIT(32)), BigInteger) % BUCKETS


def arm_columns(revision: Assignment, value: Any) -> tuple[Any, Any, Any]:
    """(arm, model_id, model_version) as SQL expressions of a bucket column ``value`` (literals
    when the revision has no split)."""
    if not revision.split:
        return literal(PRIMARY), literal(revision.model_id), literal(revision.model_version)
    whens_arm, whens_model, whens_version = [], [], []
    edge = 0
    for entry in revision.split:
        edge += int(entry["percent"])
        whens_arm.append((value < edge, literal(SPLIT)))
        whens_model.append((value < edge, literal(entry["model_id"])))
        whens_version.append((value < edge, literal(entry["model_version"])))
    return (
        case(*whens_arm, else_=literal(PRIMARY)),
        case(*whens_model, else_=literal(revision.model_id)),
        case(*whens_version, else_=literal(revision.model_version)),
    )


def shadows_of(revision: Assignment) -> list[Arm]:
    return [arm for arm in arms_of(revision) if arm.arm == SHADOW]


async def usable_shadows(session: AsyncSession, revision: Assignment) -> list[ModelVersion]:
    """The shadow versions of the revision that take new jobs (neither failed nor archived), held
    ``FOR SHARE`` until commit. A shadow version cannot be archived while an active revision
    names it (409), so this normally is all of them."""
    found = []
    for arm in shadows_of(revision):
        version = await get_model_version(session, arm.model_id, arm.model_version, for_share=True)
        if version.status not in UNUSABLE:
            found.append(version)
    return found


async def launch(
    session: AsyncSession,
    revision: Assignment,
    *,
    job_type: str,
    input: dict[str, Any],
    features: dict[str, Any] | None,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    domain_features: list[Any] | None = None,
    purpose: str | None = None,
    retry_of: str | None = None,
    primary: ModelVersion | None = None,
    check_input: bool = False,
) -> Job:
    """Start a job through ``revision``: its arm's version must take new jobs (422 otherwise)
    and, with ``check_input``, the input must match that version's contract (422); then one
    shadow copy per usable shadow version (same input, tenant, domain and service; no
    ``purpose``, so it never sets a service's status). ``primary``: the revision's own version
    when the caller has read it already."""
    arm = choose(revision, service_id)
    if primary is not None and arm.arm == PRIMARY:
        version = primary
    else:
        # held FOR SHARE until commit: it cannot turn failed or archived under the launch
        version = await get_model_version(session, arm.model_id, arm.model_version, for_share=True)
    if version.status in UNUSABLE:
        arm_note = "" if arm.arm == PRIMARY else f" (the {arm.arm} arm of {revision.assignment_key})"
        raise Unprocessable(
            f"model {version.model_id} version {version.version}{arm_note} {unusable(version.status)}; "
            f"reassign {revision.assignment_key}"
        )
    if check_input:
        _check_input(version, job_type, input)
    common: dict[str, Any] = {
        "job_type": job_type,
        "input": input,
        "features": features,
        "domain_features": domain_features,
        "assignment_id": revision.assignment_id,
        "client_id": client_id,
        "domain_id": domain_id,
        "service_id": service_id,
    }
    job = await create_job(
        session,
        model_id=version.model_id,
        model_version=version.version,
        purpose=purpose,
        retry_of=retry_of,
        handlers=version.handlers if isinstance(version.handlers, dict) else None,
        arm=arm.arm,
        **common,
    )
    await copy_to_shadows(session, revision, job, common)
    return job


async def copy_to_shadows(session: AsyncSession, revision: Assignment, job: Job, common: dict[str, Any]) -> None:
    """A shadow job per usable shadow version of the revision, copying ``job``. A shadow whose
    version would refuse the input (its contract) is skipped and said so in ``job.warnings``."""
    skipped = []
    for version in await usable_shadows(session, revision):
        problem = input_problem(version, common["job_type"], common["input"])
        if problem is not None:
            skipped.append(f"shadow copy on model {version.model_id} version {version.version} skipped: {problem}")
            continue
        await create_job(
            session,
            model_id=version.model_id,
            model_version=version.version,
            handlers=version.handlers if isinstance(version.handlers, dict) else None,
            arm=SHADOW,
            shadow_of=job.job_id,
            **common,
        )
    if skipped:
        job.warnings = [*job.warnings, *skipped]
        await session.flush()


def input_problem(version: ModelVersion, job_type: str, value: dict[str, Any]) -> str | None:
    return contract_input_problem(version.handler_contracts, job_type, value, version.model_id, version.version)


def _check_input(version: ModelVersion, job_type: str, value: dict[str, Any]) -> None:
    problem = input_problem(version, job_type, value)
    if problem is not None:
        raise Unprocessable(problem)
