"""Stored JSON: the read-side guard that keeps every stored JSON value renderable, the database's
JSON loader, and the default limits of JSON values (``PIE_JSON_MAX_DEPTH``/``PIE_JSON_MAX_ITEMS``;
the parse step of request bodies, which enforces them, is ``pie.http.body``).

Values stored before the limits existed may be nested deeper than pydantic's
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

from pydantic import SerializationInfo, SerializerFunctionWrapHandler, WrapSerializer

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ITEMS = 100_000


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
