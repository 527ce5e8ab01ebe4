"""The route class of every PIE router (``APIRouter(route_class=PieRoute)``; ``create_app``
refuses to start when a route does not use it):

- its handler sees a :class:`pie.http.body.BoundedJsonRequest`, so every JSON body goes through
  the one bounded parse step;
- after every dependency of the route has passed (authentication, the permission and tenant
  checks the endpoint declares) and the body is validated, and just before the endpoint's own
  code, it runs the callables dependencies left with :func:`before_endpoint` (``pie.idempotency``
  claims its key, or replays, only once the caller is known to be allowed to make the request);
- after the endpoint's response is rendered and before the request's transaction commits (the
  session is a function-scoped dependency, closed after this handler returns), it runs the
  callables dependencies left in ``request.state.after_response`` with that response
  (``pie.idempotency`` records the response of a keyed request in the same transaction).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from pie.http.body import BoundedJsonRequest

_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("pie_route_request", default=None)


def before_endpoint(request: Request, hook: Callable[[], Awaitable[None]]) -> None:
    """Run ``hook`` once every dependency of the route has passed, just before the endpoint
    (a dependency cannot know which of the route's other dependencies FastAPI solves after it)."""
    request.state.before_endpoint = [*getattr(request.state, "before_endpoint", []), hook]


async def _run_before_endpoint() -> None:
    request = _REQUEST.get()
    if request is None:
        return
    hooks = getattr(request.state, "before_endpoint", [])
    request.state.before_endpoint = []
    for hook in hooks:
        await hook()


def _after_dependencies(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` running the :func:`before_endpoint` hooks first. FastAPI reads the
    signature (and the names its annotations refer to) through ``__wrapped__``."""

    @functools.wraps(endpoint)
    async def endpoint_after_dependencies(*args: Any, **kwargs: Any) -> Any:
        await _run_before_endpoint()
        return await endpoint(*args, **kwargs)

    return endpoint_after_dependencies


class PieRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        if inspect.iscoroutinefunction(endpoint):
            endpoint = _after_dependencies(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def pie_handler(request: Request) -> Response:
            bounded = BoundedJsonRequest(request.scope, request.receive, request._send)
            token = _REQUEST.set(bounded)
            try:
                response = await handler(bounded)
            finally:
                _REQUEST.reset(token)
            if getattr(bounded.state, "before_endpoint", None):  # a sync endpoint: never wrapped
                raise RuntimeError(f"{self.path}: before_endpoint hooks need an async endpoint")
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
