"""The hot read of tenancy (docs/architecture.md: Fast paths), keyed by operation id: the
route's own Core read (``logic.read_service``) behind the route's tenant rule
(``pie.policies``), for the fast layer (``pie.http.fast``)."""

from __future__ import annotations

from collections.abc import Mapping

from pie import policies
from pie.auth import Principal
from pie.http.fast import HotRead, ReadAnswer
from pie.tenancy.logic import read_service
from pie.tenancy.schemas import ServiceOut


async def get_domain_service(principal: Principal | None, params: Mapping[str, str]) -> ReadAnswer:
    """``getdomainservice``: None (the route's 403/404) unless the caller may read the tenant
    and the service exists."""
    assert principal is not None  # an authenticated read: the layer verified the token
    if not policies.may_read_tenant(principal, params["client_id"]):
        return None
    row = await read_service(params["client_id"], params["domain_id"], params["service_id"])
    return None if row is None else (ServiceOut, row)


HOT_READS = {"getdomainservice": HotRead(get_domain_service)}
