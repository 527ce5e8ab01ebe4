"""The freeze check of a domain assignment upsert (spec 6.2, 6.3).

Every non-departed service's ``provided_features`` (after its ``service_updates`` patch) must
resolve against the target schema; keys the schema does not define are ignored. Resolution is
per feature, so the check is set-based and stays fast at tens of thousands of services:

* the distinct (feature, value) pairs of all non-departed services are read in one query and
  each is validated once (``Resolver.check``, memoised);
* missing mandatory features (no default) are found by one query (``NOT provided ? name``);
* only when something fails are the failing services looked up, to build ``blocking_services``;
* when the check passes for the ``default`` key, everyone's new ``resolved_features`` is
  computed by PostgreSQL in one ``UPDATE``: ``(defaults || provided_features) - unknown keys``,
  which is exactly the resolution rule (provided value, else default, else left out) once every
  value is known to be valid. The few patched services (``service_updates``) are resolved in
  Python and written by one more ``UPDATE``.

The caller holds the domain row ``FOR NO KEY UPDATE`` (service init/update hold it ``FOR SHARE``),
so no service can be written between the check and the writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, text
from sqlalchemy.ext.asyncio import AsyncSession

from pie.errors import AssignmentBlocked, Unprocessable
from pie.features import FeatureFailure, Resolver, merge_patch

_NON_DEPARTED = "(s.departure_datetime IS NULL OR s.departure_datetime > now())"
_SCOPE = "s.client_id = :client_id AND s.domain_id = :domain_id"
_UNPATCHED = "s.service_id <> ALL(CAST(:patched AS text[]))"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class FreezePlan:
    """What a passing check writes (for the ``default`` key)."""

    # service_id -> (patched provided_features, its resolved_features)
    patched: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    # resolution of every other non-departed service: (defaults || provided) - unknown keys
    defaults: dict[str, Any] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    distinct_values: int = 0


async def check_domain(
    session: AsyncSession,
    *,
    client_id: str,
    domain_id: str,
    definitions: list[Any],
    service_updates: list[tuple[str, dict[str, Any]]],
    model_id: str,
    model_version: str,
) -> FreezePlan:
    """Check every non-departed service against ``definitions``; raise ``AssignmentBlocked``
    (nothing written) or return the plan of writes."""
    plan, blocking = await _check(
        session, client_id=client_id, domain_id=domain_id, definitions=definitions, service_updates=service_updates
    )
    if blocking:
        services = len({b["service_id"] for b in blocking})
        raise AssignmentBlocked(
            f"cannot assign model {model_id} version {model_version}: "
            f"{services} service(s) have incompatible provided_features",
            blocking,
        )
    return plan


@dataclass(frozen=True)
class Target:
    """A version an upsert names and the schema it is checked against (spec 15.7)."""

    model_id: str
    model_version: str
    definitions: list[Any]
    arm: str  # primary | split | shadow


async def check_versions(
    session: AsyncSession,
    *,
    client_id: str,
    domain_id: str,
    targets: list[Target],
    service_updates: list[tuple[str, dict[str, Any]]],
) -> FreezePlan:
    """``check_domain`` for every version of an upsert: the primary first (its plan is
    returned), then the split and shadow versions of an experiment. Versions checked against
    the same schema share one check. With an experiment, every blocking entry names its
    ``model_id`` and ``model_version``; without one, the entries are those of ``check_domain``."""
    first = targets[0]
    if len(targets) == 1:
        return await check_domain(
            session,
            client_id=client_id,
            domain_id=domain_id,
            definitions=first.definitions,
            service_updates=service_updates,
            model_id=first.model_id,
            model_version=first.model_version,
        )
    checked: dict[str, tuple[FreezePlan, list[dict[str, Any]]]] = {}
    blocking: list[dict[str, Any]] = []
    blocked: list[Target] = []
    plan: FreezePlan | None = None
    for target in targets:
        fingerprint = _dumps(target.definitions)
        if fingerprint not in checked:
            checked[fingerprint] = await _check(
                session,
                client_id=client_id,
                domain_id=domain_id,
                definitions=target.definitions,
                service_updates=service_updates,
            )
        found, entries = checked[fingerprint]
        if plan is None:
            plan = found
        if entries:
            blocked.append(target)
            blocking.extend(
                {**entry, "model_id": target.model_id, "model_version": target.model_version} for entry in entries
            )
    if blocking:
        services = len({b["service_id"] for b in blocking})
        names = ", ".join(f"{t.arm} model {t.model_id} version {t.model_version}" for t in blocked)
        raise AssignmentBlocked(
            f"cannot assign model {first.model_id} version {first.model_version}: "
            f"{services} service(s) have incompatible provided_features for {names}",
            blocking,
        )
    assert plan is not None
    return plan


@dataclass
class DraftCheck:
    """What a draft of feature definitions would do to a domain's services (spec 15.1)."""

    # the 6.3 entries of every non-departed service that would not resolve
    blocking_services: list[dict[str, Any]]
    # keys some non-departed service provides that the draft does not define (kept on the
    # services, left out of their resolved features)
    unknown_keys: list[str]
    # how many non-departed services were checked
    services_checked: int


async def check_draft(session: AsyncSession, *, client_id: str, domain_id: str, definitions: list[Any]) -> DraftCheck:
    """Check every non-departed service against ``definitions`` (the dry run of a live-features
    edit, spec 15.1, and the console's preview of it): the same set-based check, its blocking
    entries answered instead of raised; nothing is written."""
    plan, blocking = await _check(
        session, client_id=client_id, domain_id=domain_id, definitions=definitions, service_updates=[]
    )
    checked = await session.scalar(
        text(f"SELECT count(*) FROM services s WHERE {_SCOPE} AND {_NON_DEPARTED}"),
        {"client_id": client_id, "domain_id": domain_id},
    )
    return DraftCheck(blocking, plan.unknown_keys, int(checked or 0))


async def _check(
    session: AsyncSession,
    *,
    client_id: str,
    domain_id: str,
    definitions: list[Any],
    service_updates: list[tuple[str, dict[str, Any]]],
) -> tuple[FreezePlan, list[dict[str, Any]]]:
    """The plan of writes and the blocking entries (sorted by service and feature; empty when
    every service passes)."""
    resolver = Resolver(definitions)
    plan = FreezePlan()
    blocking: list[dict[str, Any]] = []
    patch_ids = [sid for sid, _ in service_updates]
    params = {"client_id": client_id, "domain_id": domain_id, "patched": patch_ids}

    def block(service_id: str, failure: FeatureFailure) -> None:
        blocking.append({"service_id": service_id, **failure.as_dict()})

    # 1. service_updates: each service must exist in the domain and not be departed; patched
    #    provided features are resolved here (a handful of services)
    if patch_ids:
        rows = (
            await session.execute(
                text(
                    f"""SELECT s.service_id, s.provided_features, {_NON_DEPARTED} AS live FROM services s
                        WHERE {_SCOPE} AND s.service_id = ANY(CAST(:patched AS text[]))"""
                ),
                params,
            )
        ).all()
        stored = {row.service_id: row for row in rows}
        missing = [sid for sid in patch_ids if sid not in stored]
        if missing:
            raise Unprocessable(f"service_updates name services not in domain {domain_id}: {', '.join(missing)}")
        departed = [sid for sid in patch_ids if not stored[sid].live]
        if departed:
            raise Unprocessable(f"service_updates name departed services: {', '.join(departed)}")
        for sid, patch in service_updates:
            provided = merge_patch(stored[sid].provided_features, patch)
            resolved, failures = resolver.resolve(provided, unknown="ignore")
            for failure in failures:
                block(sid, failure)
            plan.patched[sid] = (provided, resolved)

    # 2. every other non-departed service: each distinct (feature, value) validated once
    pairs = (
        await session.execute(
            text(
                f"""SELECT e.key, e.value::text AS value_json
                    FROM services s CROSS JOIN LATERAL jsonb_each(s.provided_features) AS e
                    WHERE {_SCOPE} AND {_NON_DEPARTED} AND {_UNPATCHED}
                    GROUP BY e.key, e.value"""
            ),
            params,
        )
    ).all()
    plan.distinct_values = len(pairs)
    failing_pairs: dict[tuple[str, str], str] = {}
    unknown: set[str] = set()
    for key, value_json in pairs:
        if key not in resolver.names:
            unknown.add(key)
            continue
        # the pairs are distinct already: no memo needed
        reason = resolver.check(key, json.loads(value_json), memo=False)
        if reason is not None:
            failing_pairs[(key, value_json)] = reason
    plan.unknown_keys = sorted(unknown)

    # defaults (validated once each) fill in absent features; mandatory ones without a default
    # fail where absent; an invalid default (a broken schema) fails wherever it would be used
    absent_failures: dict[str, FeatureFailure] = {}
    for definition in resolver.definitions:
        name, schema = definition["name"], definition["json_schema"]
        if isinstance(schema, dict) and "default" in schema:
            reason = resolver.check(name, schema["default"])
            if reason is None:
                plan.defaults[name] = schema["default"]
            else:
                absent_failures[name] = FeatureFailure(name, schema["default"], reason)
        elif definition.get("mandatory"):
            absent_failures[name] = FeatureFailure(name, None, "missing mandatory feature")
    if absent_failures:
        rows = (
            await session.execute(
                text(
                    f"""SELECT s.service_id, m.name FROM services s CROSS JOIN unnest(CAST(:names AS text[])) AS m(name)
                        WHERE {_SCOPE} AND {_NON_DEPARTED} AND {_UNPATCHED} AND NOT (s.provided_features ? m.name)"""
                ),
                {**params, "names": list(absent_failures)},
            )
        ).all()
        for service_id, name in rows:
            block(service_id, absent_failures[name])

    # 3. the failure path only: which services carry the failing values
    if failing_pairs:
        keys = [k for k, _ in failing_pairs]
        values = [v for _, v in failing_pairs]
        rows = (
            await session.execute(
                text(
                    f"""SELECT s.service_id, e.key, e.value::text AS value_json
                        FROM services s CROSS JOIN LATERAL jsonb_each(s.provided_features) AS e
                        WHERE {_SCOPE} AND {_NON_DEPARTED} AND {_UNPATCHED}
                          AND (e.key, e.value) IN (
                              SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:values AS jsonb[])))"""
                ),
                {**params, "keys": keys, "values": values},
            )
        ).all()
        for service_id, key, value_json in rows:
            reason = failing_pairs.get((key, value_json))
            if reason is None:  # the same jsonb value in another text form
                reason = resolver.check(key, json.loads(value_json)) or "invalid value"
            block(service_id, FeatureFailure(key, json.loads(value_json), reason))

    blocking.sort(key=lambda b: (b["service_id"], b["feature"]))
    return plan, blocking


async def apply_plan(session: AsyncSession, *, client_id: str, domain_id: str, plan: FreezePlan) -> int:
    """Write the patches and re-resolve every non-departed service in bulk; returns how many
    services got new ``resolved_features``."""
    params = {"client_id": client_id, "domain_id": domain_id, "patched": list(plan.patched)}
    changed = 0
    if plan.patched:
        patches = {sid: {"p": provided, "r": resolved} for sid, (provided, resolved) in plan.patched.items()}
        result = await session.execute(
            text(
                f"""UPDATE services AS s
                    SET provided_features = p.value -> 'p', resolved_features = p.value -> 'r',
                        updated_at = clock_timestamp()
                    FROM jsonb_each(CAST(:patches AS jsonb)) AS p
                    WHERE {_SCOPE} AND s.service_id = p.key"""
            ),
            {**params, "patches": _dumps(patches)},
        )
        changed += cast(CursorResult[Any], result).rowcount  # a textual UPDATE's result is a cursor result
    result = await session.execute(
        text(
            f"""UPDATE services AS s
                SET resolved_features = (CAST(:defaults AS jsonb) || s.provided_features) - CAST(:unknown AS text[]),
                    updated_at = clock_timestamp()
                WHERE {_SCOPE} AND {_NON_DEPARTED} AND {_UNPATCHED}
                  AND s.resolved_features IS DISTINCT FROM
                      (CAST(:defaults AS jsonb) || s.provided_features) - CAST(:unknown AS text[])"""
        ),
        {**params, "defaults": _dumps(plan.defaults), "unknown": plan.unknown_keys},
    )
    return changed + cast(CursorResult[Any], result).rowcount


async def count_plan(
    session: AsyncSession, *, client_id: str, domain_id: str, plan: FreezePlan, re_resolve: bool
) -> tuple[int, int]:
    """What a passing check would touch, without writing (a dry run): the non-departed services
    checked, and how many ``apply_plan`` would re-resolve (the patched ones plus those whose
    ``resolved_features`` would change: the same predicate as its ``UPDATE``). One query."""
    row = (
        await session.execute(
            text(
                f"""SELECT count(*) AS checked,
                           count(*) FILTER (
                               WHERE s.service_id = ANY(CAST(:patched AS text[]))
                                  OR s.resolved_features IS DISTINCT FROM
                                     (CAST(:defaults AS jsonb) || s.provided_features) - CAST(:unknown AS text[])
                           ) AS re_resolved
                    FROM services s WHERE {_SCOPE} AND {_NON_DEPARTED}"""
            ),
            {
                "client_id": client_id,
                "domain_id": domain_id,
                "patched": list(plan.patched),
                "defaults": _dumps(plan.defaults),
                "unknown": plan.unknown_keys,
            },
        )
    ).one()
    return int(row.checked), int(row.re_resolved) if re_resolve else 0
