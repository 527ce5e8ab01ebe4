"""The one parse step for JSON request bodies, bounded in depth and container size, and the
read-side guard that keeps every stored JSON value renderable.

Parsing: every API route uses :class:`pie.routing.PieRoute`, whose request class parses the body once
with the C parser (``json.loads`` on the received bytes, no decoded copy) and then walks the
result without recursion to enforce ``PIE_JSON_MAX_DEPTH`` and ``PIE_JSON_MAX_ITEMS``. The parsed
Python objects go to pydantic's ``model_validate`` as FastAPI does anyway, so schema rules
(strict fields, types) stay where they are. A body beyond a limit is a 400 naming the limit
(``json.JSONDecodeError`` subclass: FastAPI turns it into the request-validation error, whose
handler authenticates first, so an anonymous caller still gets the 401).

Reading: values stored before the limits existed may be nested deeper than pydantic's
serializer allows (about 255 levels, "maximum serialization depth exceeded").
:data:`StoredJson` fields serialize normally and, only when that fails, render the subtrees
below ``RENDER_DEPTH`` as their JSON text, so a get or a list never fails because of one row.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Request
from pydantic import SerializationInfo, SerializerFunctionWrapHandler, WrapSerializer

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ITEMS = 100_000


class JsonLimitExceeded(json.JSONDecodeError):
    """A well-formed body beyond a configured limit (FastAPI renders decode errors as 400)."""

    def __init__(self, message: str, doc: str | bytes = "", pos: int = 0):
        # JSONDecodeError formats "msg: line 1 column 1 (char 0)"; keep the message clean
        ValueError.__init__(self, message)
        self.msg = message
        self.doc = doc if isinstance(doc, str) else ""
        self.pos = pos
        self.lineno = 1
        self.colno = pos + 1

    def __str__(self) -> str:
        return self.msg


LIMIT_MESSAGE_PREFIX = "JSON body exceeds a limit: "


def depth_message(max_depth: int) -> str:
    return f"{LIMIT_MESSAGE_PREFIX}nested deeper than {max_depth} levels (PIE_JSON_MAX_DEPTH)"


def items_message(max_items: int) -> str:
    return f"{LIMIT_MESSAGE_PREFIX}an array or object has more than {max_items} items (PIE_JSON_MAX_ITEMS)"


def check_limits(value: Any, *, max_depth: int, max_items: int) -> str | None:
    """Why ``value`` is beyond the limits, or None. Iterative (no recursion on caller data); the
    top-level value is depth 1, each enclosing array or object adds one."""
    if not isinstance(value, (dict, list)):
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if depth > max_depth:
            return depth_message(max_depth)
        if len(item) > max_items:
            return items_message(max_items)
        children = item.values() if isinstance(item, dict) else item
        child_depth = depth + 1
        for child in children:
            if isinstance(child, (dict, list)):
                push((child, child_depth))
    return None


def parse_bounded(body: bytes | str, *, max_depth: int, max_items: int) -> Any:
    """Parse ``body`` once; :class:`JsonLimitExceeded` beyond the limits, ``json.JSONDecodeError``
    when malformed."""
    try:
        value = json.loads(body)
    except RecursionError:  # deeper than the interpreter allows: far beyond any configured depth
        raise JsonLimitExceeded(depth_message(max_depth)) from None
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("body is not UTF-8", "", exc.start) from None
    problem = check_limits(value, max_depth=max_depth, max_items=max_items)
    if problem is not None:
        raise JsonLimitExceeded(problem)
    return value


def _limits(request: Request) -> tuple[int, int]:
    settings = getattr(request.app.state, "settings", None)
    return (
        getattr(settings, "json_max_depth", DEFAULT_MAX_DEPTH),
        getattr(settings, "json_max_items", DEFAULT_MAX_ITEMS),
    )


class BoundedJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            max_depth, max_items = _limits(self)
            self._json = parse_bounded(await self.body(), max_depth=max_depth, max_items=max_items)
        return self._json


# ---- read side ---------------------------------------------------------------------------------

# subtrees deeper than this are rendered as JSON text when a stored value cannot be serialized
RENDER_DEPTH = DEFAULT_MAX_DEPTH


def _as_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (RecursionError, ValueError, TypeError):
        return "<stored JSON value too deep to render>"


def render_shallow(value: Any, max_depth: int = RENDER_DEPTH) -> Any:
    """A copy of ``value`` whose containers at ``max_depth`` are replaced by their JSON text.
    Iterative, so any stored depth works."""
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        pairs = source.items() if isinstance(source, dict) else enumerate(source)
        for key, child in pairs:
            if isinstance(child, (dict, list)):
                if depth >= max_depth:
                    out: Any = _as_text(child)
                else:
                    out = {} if isinstance(child, dict) else []
                    stack.append((child, out, depth + 1))
            else:
                out = child
            if isinstance(target, dict):
                target[key] = out
            else:
                target.append(out)
    return root


def _serialize_stored(value: Any, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
    try:
        return handler(value)
    except ValueError:  # PydanticSerializationError: "maximum serialization depth exceeded"
        if not info.mode_is_json():
            raise
        return handler(render_shallow(value))


_stored = WrapSerializer(_serialize_stored, when_used="always")
#: a JSON value read from the database (any depth renders; see the module docstring)
StoredJson = Annotated[Any, _stored]
StoredObject = Annotated[dict[str, Any], _stored]
StoredList = Annotated[list[Any], _stored]
