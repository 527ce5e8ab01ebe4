"""The one parse step for JSON request bodies, bounded in depth and container size, and the
read-side guard that keeps every stored JSON value renderable.

Parsing: every API route uses :class:`pie.routing.PieRoute`, whose request class parses the body once
with the C parser (``json.loads`` on the received bytes, no decoded copy; an object naming a key
twice is refused, spec 15.5) and then walks the result without recursion to enforce
``PIE_JSON_MAX_DEPTH`` and ``PIE_JSON_MAX_ITEMS``. The fast inference path (``pie.registry.hot``)
parses with the same function. The parsed
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
import re
from collections.abc import Callable
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Annotated, Any, cast

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


# ---- read side ---------------------------------------------------------------------------------

# subtrees deeper than this are rendered as JSON text when a stored value cannot be serialized
RENDER_DEPTH = DEFAULT_MAX_DEPTH


def _as_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except RecursionError:
        return dumps_iterative(value)


_encode_scalar = json.JSONEncoder(ensure_ascii=False).encode


def dumps_iterative(value: Any) -> str:
    """``json.dumps`` for any depth (no recursion)."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Literal):
            out.append(item.text)
        elif isinstance(item, dict):
            out.append("{")
            parts: list[Any] = []
            for index, (key, child) in enumerate(item.items()):
                parts.append(_Literal(("," if index else "") + _encode_scalar(str(key)) + ":"))
                parts.append(child)
            parts.append(_Literal("}"))
            stack.extend(reversed(parts))
        elif isinstance(item, list):
            out.append("[")
            parts = []
            for index, child in enumerate(item):
                if index:
                    parts.append(_Literal(","))
                parts.append(child)
            parts.append(_Literal("]"))
            stack.extend(reversed(parts))
        else:
            out.append(_encode_scalar(item))
    return "".join(out)


class _Literal:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS = {"true": True, "false": False, "null": None}


def loads_iterative(text: str) -> Any:
    """``json.loads`` for any depth (no recursion) - for stored values deeper than the C parser
    goes (PostgreSQL's jsonb text, so well-formed)."""
    # _WS matches the empty string, so it matches at every position (even past the end): never None
    ws = cast("Callable[[str, int], re.Match[str]]", _WS.match)
    stack: list[list[Any]] = []  # [container, pending key]
    i = ws(text, 0).end()
    while True:
        ch = text[i]
        if ch == "{" or ch == "[":
            container: Any = {} if ch == "{" else []
            i = ws(text, i + 1).end()
            if text[i] == ("}" if ch == "{" else "]"):
                value: Any = container
                i += 1
            else:
                key = None
                if ch == "{":
                    key, i = scanstring(text, i + 1)
                    i = ws(text, ws(text, i).end() + 1).end()  # past ':'
                stack.append([container, key])
                continue
        elif ch == '"':
            value, i = scanstring(text, i + 1)
        elif text.startswith(("true", "false", "null"), i):
            word = "true" if text.startswith("true", i) else "false" if text.startswith("false", i) else "null"
            value = _CONSTANTS[word]
            i += len(word)
        else:
            match = _NUMBER.match(text, i)
            if match is None:
                raise ValueError(f"invalid JSON at {i}")
            number = match.group()
            value = float(number) if match.group(1) or match.group(2) else int(number)
            i = match.end()
        while True:  # attach the value; close finished containers
            if not stack:
                if ws(text, i).end() != len(text):
                    raise ValueError("extra data after the JSON value")
                return value
            frame = stack[-1]
            if isinstance(frame[0], dict):
                frame[0][frame[1]] = value
            else:
                frame[0].append(value)
            i = ws(text, i).end()
            if text[i] == ",":
                i = ws(text, i + 1).end()
                if isinstance(frame[0], dict):
                    frame[1], i = scanstring(text, i + 1)
                    i = ws(text, ws(text, i).end() + 1).end()
                break
            value = stack.pop()[0]  # '}' or ']'
            i += 1


def load_stored(data: bytes | str) -> Any:
    """The database's JSON loader (``create_engine(json_deserializer=...)``): the C parser, and
    the iterative one for a value nested deeper than the interpreter's recursion allows (stored
    before the limits existed, or written by hand), so loading a row never fails on depth."""
    try:
        return json.loads(data)
    except RecursionError:
        return loads_iterative(data.decode() if isinstance(data, (bytes, bytearray, memoryview)) else data)


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
