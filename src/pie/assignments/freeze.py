"""The freeze check of a domain assignment upsert (spec 6.2, 6.3).

Every non-departed service's ``provided_features`` (after its ``service_updates`` patch) must
resolve against the target schema; keys the schema does not define are ignored. The check is
set-based so it stays fast at tens of thousands of services:

* services are read grouped by identical ``provided_features`` (``GROUP BY`` in SQL), so each
  distinct feature set is resolved once, and the resolver memoises each distinct
  (feature, value) validation;
* when the check passes for the ``default`` key, the new ``resolved_features`` are written by
  one ``UPDATE ... FROM jsonb_to_recordset(...)`` joining services to the distinct
  (provided → resolved) pairs, plus one ``UPDATE`` for the patched services' ``provided_features``.

The caller holds the domain row ``FOR NO KEY UPDATE`` (service init/update hold it ``FOR SHARE``),
so no service can be written between the check and the writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pie.errors import AssignmentBlocked, Unprocessable
from pie.features import Resolver, merge_patch

_NON_DEPARTED = "(departure_datetime IS NULL OR departure_datetime > now())"
_S_NON_DEPARTED = "(s.departure_datetime IS NULL OR s.departure_datetime > now())"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class FreezePlan:
    """What a passing check would write."""

    # service_id -> patched provided_features (JSON text)
    patched: dict[str, str] = field(default_factory=dict)
    # distinct provided_features (JSON text, as stored or as patched) -> resolved_features
    resolved_by_provided: dict[str, dict[str, Any]] = field(default_factory=dict)
    services_checked: int = 0


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
    resolver = Resolver(definitions)
    plan = FreezePlan()
    blocking: list[dict[str, Any]] = []
    failing_services: set[str] = set()

    # 1. service_updates: each service must exist in the domain and not be departed
    patch_ids = [sid for sid, _ in service_updates]
    if patch_ids:
        rows = (
            await session.execute(
                text(
                    f"""SELECT service_id, provided_features, {_NON_DEPARTED} AS live
                        FROM services
                        WHERE client_id = :client_id AND domain_id = :domain_id AND service_id = ANY(CAST(:ids AS text[]))"""
                ),
                {"client_id": client_id, "domain_id": domain_id, "ids": patch_ids},
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
            provided_json = _dumps(provided)
            plan.patched[sid] = provided_json
            if provided_json not in plan.resolved_by_provided:
                resolved, failures = resolver.resolve(provided, unknown="ignore")
                plan.resolved_by_provided[provided_json] = resolved
                if failures:
                    failing_services.add(sid)
                    blocking.extend({"service_id": sid, **f.as_dict()} for f in failures)
            plan.services_checked += 1

    # 2. every other non-departed service, one resolution per distinct provided_features
    groups = (
        await session.execute(
            text(
                f"""SELECT provided_features::text AS provided_json, count(*) AS n
                    FROM services
                    WHERE client_id = :client_id AND domain_id = :domain_id AND {_NON_DEPARTED}
                      AND service_id <> ALL(CAST(:patched AS text[]))
                    GROUP BY provided_features"""
            ),
            {"client_id": client_id, "domain_id": domain_id, "patched": patch_ids},
        )
    ).all()
    failing_groups: dict[str, list[Any]] = {}
    for provided_json, count in groups:
        plan.services_checked += count
        resolved, failures = resolver.resolve(json.loads(provided_json), unknown="ignore")
        plan.resolved_by_provided.setdefault(provided_json, resolved)
        if failures:
            failing_groups[provided_json] = failures

    if failing_groups:
        # the failure path only: which services carry the failing feature sets
        rows = (
            await session.execute(
                text(
                    f"""SELECT service_id, provided_features::text AS provided_json
                        FROM services
                        WHERE client_id = :client_id AND domain_id = :domain_id AND {_NON_DEPARTED}
                          AND service_id <> ALL(CAST(:patched AS text[]))
                          AND provided_features = ANY(CAST(:failing AS jsonb[]))"""
                ),
                {"client_id": client_id, "domain_id": domain_id, "patched": patch_ids, "failing": list(failing_groups)},
            )
        ).all()
        for sid, provided_json in rows:
            failures = failing_groups.get(provided_json)
            if failures is None:  # same jsonb value, different text form: resolve it directly
                _, failures = resolver.resolve(json.loads(provided_json), unknown="ignore")
            failing_services.add(sid)
            blocking.extend({"service_id": sid, **f.as_dict()} for f in failures)

    if blocking:
        blocking.sort(key=lambda b: (b["service_id"], b["feature"]))
        raise AssignmentBlocked(
            f"cannot assign model {model_id} version {model_version}: "
            f"{len(failing_services)} service(s) have incompatible provided_features",
            blocking,
        )
    return plan


async def apply_plan(session: AsyncSession, *, client_id: str, domain_id: str, plan: FreezePlan) -> int:
    """Write the patches and re-resolve every non-departed service in bulk; returns how many
    services got new ``resolved_features``."""
    params = {"client_id": client_id, "domain_id": domain_id}
    if plan.patched:
        await session.execute(
            text(
                """UPDATE services AS s
                   SET provided_features = p.value, updated_at = clock_timestamp()
                   FROM jsonb_each(CAST(:patched AS jsonb)) AS p
                   WHERE s.client_id = :client_id AND s.domain_id = :domain_id AND s.service_id = p.key"""
            ),
            {**params, "patched": "{" + ",".join(f"{_dumps(k)}:{v}" for k, v in plan.patched.items()) + "}"},
        )
    if not plan.resolved_by_provided:
        return 0
    pairs = "[" + ",".join(
        f'{{"p":{provided_json},"r":{_dumps(resolved)}}}' for provided_json, resolved in plan.resolved_by_provided.items()
    ) + "]"
    result = await session.execute(
        text(
            f"""UPDATE services AS s
                SET resolved_features = m.r, updated_at = clock_timestamp()
                FROM jsonb_to_recordset(CAST(:pairs AS jsonb)) AS m(p jsonb, r jsonb)
                WHERE s.client_id = :client_id AND s.domain_id = :domain_id AND {_S_NON_DEPARTED}
                  AND s.provided_features = m.p
                  AND s.resolved_features IS DISTINCT FROM m.r"""
        ),
        {**params, "pairs": pairs},
    )
    return result.rowcount
