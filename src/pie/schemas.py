"""Types shared by every capability's schemas."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, StringConstraints, WithJsonSchema, model_validator

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
KEY_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
AssignmentKey = Annotated[str, StringConstraints(pattern=KEY_PATTERN)]

# the lengths of free text a caller names things with (spec 15.5): beyond them, 400
NAME_MAX_LENGTH = 200
DESCRIPTION_MAX_LENGTH = 10_000
#: a ``name`` or ``label``
Name = Annotated[str, StringConstraints(max_length=NAME_MAX_LENGTH)]
#: a ``description``
Description = Annotated[str, StringConstraints(max_length=DESCRIPTION_MAX_LENGTH)]


def iso_z(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# documented as an RFC 3339 ``date-time`` (typed clients parse it into a datetime)
UtcDatetime = Annotated[
    datetime,
    PlainSerializer(iso_z, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def _text_problem(value: str) -> str | None:
    found = _UNSTORABLE_TEXT.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "text must not contain NUL (\\u0000) characters"
    return "text must not contain unpaired UTF-16 surrogates"


def _storable_fast(value: Any) -> bool:
    """True when every string and number in ``value`` can be stored (no allocation per item)."""
    stack: list[Any] = [value]
    pop, extend = stack.pop, stack.extend
    search, isfinite = _UNSTORABLE_TEXT.search, math.isfinite
    while stack:
        item = pop()
        if isinstance(item, str):
            if search(item) is not None:
                return False
        elif isinstance(item, float):
            if not isfinite(item):
                return False
        elif isinstance(item, dict):
            for key in item:
                if isinstance(key, str) and search(key) is not None:
                    return False
            extend(item.values())
        elif isinstance(item, (list, tuple)):
            extend(item)
    return True


def unstorable_json(value: Any) -> str | None:
    """Why parsed JSON ``value`` cannot be stored in PostgreSQL (text and jsonb reject NUL
    characters and unpaired surrogates; jsonb rejects NaN and Infinity, which Python's JSON
    parser accepts, also from numbers such as 1e400), naming the place; None when storable.
    Iterative, so any nesting the parser accepted is fine; the places are only spelled out once
    a problem was found (a path string per element would cost several times the body's size)."""
    if _storable_fast(value):
        return None
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem is not None:
                return f"{where or 'value'}: {problem}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{where or 'value'}: numbers must be finite (NaN and Infinity are not JSON numbers)"
        elif isinstance(item, dict):
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and (problem := _text_problem(key)) is not None:
                    return f"{where or 'value'}: key {key!r}: {problem}"
                stack.append((child, path))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
    return None


class RequestBody(BaseModel):
    """Base of request bodies: strict types (no silent coercion of "5" into 5), no unknown fields
    (a misspelt field is a 400 naming it, never silently dropped: PUTs replace, so a typo would
    erase data), and only JSON that PostgreSQL can store (a 400 naming the field, not a database
    error later). Free-form JSON fields (``input``, ``metadata``, ``settings`` ...) are plain
    dicts and keep whatever keys they are given."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        problem = unstorable_json(data)
        if problem is not None:
            raise ValueError(problem)
        return data


class ResponseBody(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)
