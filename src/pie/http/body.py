"""The one parse step for JSON request bodies, bounded in depth and container size.

Every API route uses :class:`pie.http.routing.PieRoute`, whose request class parses the body once
with the C parser (``json.loads`` on the received bytes, no decoded copy; an object naming a key
twice is refused, spec 15.5) and then walks the result without recursion to enforce
``PIE_JSON_MAX_DEPTH`` and ``PIE_JSON_MAX_ITEMS``. The fast inference path (``pie.registry.hot``)
parses with the same function. The parsed
Python objects go to pydantic's ``model_validate`` as FastAPI does anyway, so schema rules
(strict fields, types) stay where they are. A body beyond a limit is a 400 naming the limit
(``json.JSONDecodeError`` subclass: FastAPI turns it into the request-validation error, whose
handler authenticates first, so an anonymous caller still gets the 401).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from pie.jsonbody import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS


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
REPEATED_KEY_MESSAGE_PREFIX = "JSON body repeats the key "
#: messages of a well-formed body this parser refuses (the 400 shows them as they are)
REFUSAL_PREFIXES = (LIMIT_MESSAGE_PREFIX, REPEATED_KEY_MESSAGE_PREFIX)
_SHOWN_KEY = 100  # characters of a repeated key shown in the message


class RepeatedKey(JsonLimitExceeded):
    """One JSON object names a key twice (RFC 8259 leaves the meaning open; Python keeps the
    last value silently): a 400 naming the key (spec 15.5)."""

    def __init__(self, key: str):
        shown = json.dumps(key if len(key) <= _SHOWN_KEY else key[:_SHOWN_KEY] + "...")
        super().__init__(f"{REPEATED_KEY_MESSAGE_PREFIX}{shown} in one object")
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object, or :class:`RepeatedKey` (one ``dict`` and a length
    comparison per object; the repeated key is only searched for once there is one)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return value


def loads(body: bytes | str) -> Any:
    """``json.loads`` refusing a repeated key in any object (:class:`RepeatedKey`)."""
    return json.loads(body, object_pairs_hook=_object)


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
    """Parse ``body`` once; :class:`JsonLimitExceeded` beyond the limits or with a repeated key
    in an object (:class:`RepeatedKey`), ``json.JSONDecodeError`` when malformed."""
    try:
        value = loads(body)
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
