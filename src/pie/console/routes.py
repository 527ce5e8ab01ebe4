"""The operator console at ``/console``: server-rendered pages over the same logic functions and
the same permission and tenant rules as the API (``pie.deps.tenant_scope``, ``Principal.require``,
``pie.jobs.logic.visible_jobs``), so a page never shows a caller more than the API would.

Pages are thin: each calls the logic the matching API route calls and renders a template. A
domain exception becomes an HTML error page with the same status the API would answer; a
missing or ended session becomes a redirect to the sign-in page.

One module per concern, each with its own router, gathered here under ``/console``:
``login`` (sign-in), ``tenants`` (clients), ``domains`` (domains, live features, services),
``assignments`` (keys: history, launch, move), ``registry`` (models, versions, subscriptions),
``jobs`` (overview, jobs, queue), ``audit`` (the audit log) and ``webhooks`` (a tenant's
webhooks and their deliveries). ``common`` holds what they share.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from pie.console import assignments, audit, domains, jobs, login, registry, tenants, webhooks
from pie.console.common import STATIC_DIR, console_router
from pie.errors import NotFound

__all__ = ["STATIC_DIR", "router"]

_fallback = console_router()


@_fallback.get("/{unknown:path}", response_class=HTMLResponse)
async def unknown_page(request: Request, unknown: str):
    """Any other console path: the 404 page (not the API's JSON envelope)."""
    raise NotFound(f"no console page {request.url.path}")


router = APIRouter(include_in_schema=False)
# the catch-all comes last: every other console route is matched first
for module in (login, jobs, tenants, domains, assignments, registry, audit, webhooks):
    router.include_router(module.router)
router.include_router(_fallback)
