"""Strict query strings (spec 14.3): a query parameter that the matched operation does not
declare is a 400 naming it, on every route, from one app-wide dependency.

The declared names are read from the route's own FastAPI dependency tree (the same source the
OpenAPI document is built from), so a route that adds a ``Query`` parameter — directly or
through a dependency such as ``PageParams`` — accepts it with no further registration. Headers
are not query parameters and are never checked here.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.security.base import SecurityBase

from pie.errors import BadRequest

# cached on the route object itself: (declared query parameter names, needs a bearer token)
_ATTRIBUTE = "_pie_declared_query"


def _declared(route: object) -> tuple[frozenset[str], bool]:
    found = getattr(route, _ATTRIBUTE, None)
    if found is None:
        names: set[str] = set()
        secured = False
        pending = [getattr(route, "dependant", None)]
        while pending:
            dependant = pending.pop()
            if dependant is None:
                continue
            names.update(param.alias for param in dependant.query_params)
            secured = secured or isinstance(dependant.call, SecurityBase)
            pending.extend(dependant.dependencies)
        found = (frozenset(names), secured)
        setattr(route, _ATTRIBUTE, found)
    return found


async def reject_unknown_query_params(request: Request) -> None:
    """400 when the query string names a parameter the operation does not declare. On routes
    that need a token, the caller is authenticated first, so an unauthenticated request is a
    401 whatever its query string (as for a malformed body)."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    if route is None:
        return
    declared, authenticated = _declared(route)
    unknown = sorted({name for name in request.query_params if name not in declared})
    if not unknown:
        return
    if authenticated:
        from pie.deps import authenticate

        await authenticate(request)
    allowed = ", ".join(sorted(declared)) or "none"
    names = ", ".join(repr(name) for name in unknown)
    raise BadRequest(
        f"unknown query parameter{'s' if len(unknown) > 1 else ''} {names} (this operation accepts: {allowed})"
    )
