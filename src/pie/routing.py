"""The route class of every PIE router (``APIRouter(route_class=PieRoute)``; ``create_app``
refuses to start when a route does not use it):

- its handler sees a :class:`pie.jsonbody.BoundedJsonRequest`, so every JSON body goes through
  the one bounded parse step;
- after the endpoint's response is rendered and before the request's transaction commits (the
  session is a function-scoped dependency, closed after this handler returns), it runs the
  callables dependencies left in ``request.state.after_response`` with that response
  (``pie.idempotency`` records the response of a keyed request in the same transaction).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from pie.jsonbody import BoundedJsonRequest


class PieRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def pie_handler(request: Request) -> Response:
            bounded = BoundedJsonRequest(request.scope, request.receive, request._send)
            response = await handler(bounded)
            for hook in getattr(bounded.state, "after_response", ()):
                await hook(response)
            return response

        return pie_handler


def flat_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route of an app, those of included routers too (FastAPI >= 0.16x keeps an included
    router as one ``_IncludedRouter`` entry of ``app.routes``, holding the router it wraps)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from flat_routes(included.routes)
        else:
            yield route


def routes_without_pie_route(routes: Iterable[Any]) -> list[str]:
    """API routes that would bypass the bounded parser and the after-response hooks."""
    return [
        f"{sorted(route.methods or [])} {route.path}"
        for route in flat_routes(routes)
        if isinstance(route, APIRoute) and not isinstance(route, PieRoute)
    ]
