"""The hot read of assignments (docs/architecture.md: Fast paths), keyed by operation id: the
route's own Core read (``logic.read_active_domain_revision``) behind the route's tenant rule
(``pie.policies``), for the fast layer (``pie.http.fast``)."""

from __future__ import annotations

from collections.abc import Mapping

from pie import policies
from pie.assignments.logic import read_active_domain_revision
from pie.assignments.schemas import AssignmentOut
from pie.auth import Principal
from pie.http.fast import HotRead, ReadAnswer


async def get_domain_assignment(principal: Principal | None, params: Mapping[str, str]) -> ReadAnswer:
    """``getdomainmodelassignment``: None (the route's 403/404) unless the caller may read the
    tenant and the key has an active revision."""
    assert principal is not None  # an authenticated read: the layer verified the token
    if not policies.may_read_tenant(principal, params["client_id"]):
        return None
    row = await read_active_domain_revision(params["client_id"], params["domain_id"], params["assignment_key"])
    return None if row is None else (AssignmentOut, row)


HOT_READS = {"getdomainmodelassignment": HotRead(get_domain_assignment)}
