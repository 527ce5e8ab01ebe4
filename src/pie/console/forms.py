"""HTML forms to and from the API's JSON bodies: feature definitions as table rows (the features
editor), feature values typed by their schema (service forms), date-times. Pure functions: the
meaning of the result is then checked by the API's own code (``validate_feature_definitions``,
the request schemas, the logic)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pie.errors import BadRequest
from pie.http.body import loads as json_loads_strict  # a repeated key is refused, as in API bodies

# the types a row edits directly; "other" rows carry their JSON Schema as text
SIMPLE_TYPES = ("string", "integer", "number", "boolean", "array", "object")
ROW_TYPES = (*SIMPLE_TYPES, "other")
_SIMPLE_KEYS = {"type", "enum", "minimum", "maximum", "default"}
_DEFINITION_KEYS = ("name", "json_schema", "mandatory")
_ROW_FIELD = re.compile(r"^f(\d{1,4})_([a-z]+)$")
MAX_ROWS = 500


@dataclass
class FeatureRow:
    """One feature definition as the editor shows it (every field is the text of an input)."""

    name: str = ""
    type: str = "string"
    values: str = ""  # allowed values (enum), one per line
    minimum: str = ""
    maximum: str = ""
    default: str = ""
    mandatory: bool = False
    schema: str = ""  # the JSON Schema of an "other" row
    extra: str = ""  # the definition's other keys (e.g. a description), JSON, kept as they are
    remove: bool = False

    def blank(self) -> bool:
        return not any((self.name, self.values, self.minimum, self.maximum, self.default, self.schema))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _is_simple(schema: Any) -> bool:
    if not isinstance(schema, dict) or schema.get("type") not in SIMPLE_TYPES or not set(schema) <= _SIMPLE_KEYS:
        return False
    kind = schema["type"]
    if kind in ("boolean", "array", "object") and ({"enum", "minimum", "maximum"} & set(schema)):
        return False
    if kind == "string" and ({"minimum", "maximum"} & set(schema)):
        return False
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            return False
        if kind == "string" and not all(isinstance(v, str) and "\n" not in v and v == v.strip() for v in values):
            return False
        if kind == "integer" and not all(type(v) is int for v in values):
            return False
        if kind == "number" and not all(type(v) in (int, float) for v in values):
            return False
    for bound in ("minimum", "maximum"):
        if bound in schema and type(schema[bound]) not in (int, float):
            return False
    return not (kind == "string" and "default" in schema and not isinstance(schema["default"], str))


def row_of(definition: Any) -> FeatureRow:
    """The editor row of a stored definition ("other" when its schema uses more than a row edits)."""
    if not isinstance(definition, dict):
        return FeatureRow(type="other", schema=json.dumps(definition, indent=2))
    schema = definition.get("json_schema")
    extra = {k: v for k, v in definition.items() if k not in _DEFINITION_KEYS}
    row = FeatureRow(
        name=str(definition.get("name", "")),
        mandatory=bool(definition.get("mandatory")),
        extra=json.dumps(extra, ensure_ascii=False) if extra else "",
    )
    if not _is_simple(schema):
        row.type = "other"
        row.schema = json.dumps(schema, indent=2, ensure_ascii=False)
        return row
    assert isinstance(schema, dict)
    row.type = schema["type"]
    if "enum" in schema:
        row.values = "\n".join(_text(v) for v in schema["enum"])
    row.minimum = _text(schema["minimum"]) if "minimum" in schema else ""
    row.maximum = _text(schema["maximum"]) if "maximum" in schema else ""
    if "default" in schema:
        row.default = schema["default"] if row.type == "string" else json.dumps(schema["default"], ensure_ascii=False)
    return row


def rows_of(definitions: Any) -> list[FeatureRow]:
    return [row_of(d) for d in (definitions if isinstance(definitions, list) else [])]


def rows_from_form(items: list[tuple[str, str]]) -> list[FeatureRow]:
    """The rows of a submitted editor form (fields ``f<i>_<field>``), in row order."""
    rows: dict[int, FeatureRow] = {}
    for key, value in items:
        match = _ROW_FIELD.match(key)
        if match is None:
            continue
        index, name = int(match.group(1)), match.group(2)
        if name not in FeatureRow.__dataclass_fields__:
            continue
        row = rows.setdefault(index, FeatureRow())
        if len(rows) > MAX_ROWS:
            raise BadRequest(f"at most {MAX_ROWS} feature rows")
        if name in ("mandatory", "remove"):
            setattr(row, name, True)
        elif name == "type":
            row.type = value if value in ROW_TYPES else "other"
        else:
            setattr(row, name, value.replace("\r\n", "\n") if name in ("values", "schema") else value.strip())
    return [rows[i] for i in sorted(rows)]


def _json(text: str, what: str) -> Any:
    try:
        return json_loads_strict(text)
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from exc


def _typed(text: str, kind: str, what: str) -> Any:
    """A value typed in a row's field, as the row's type reads it."""
    if kind == "string":
        return text
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise BadRequest(f"{what} must be true or false")
        return text.lower() == "true"
    value = _json(text, what)
    if kind == "integer" and type(value) is not int:
        raise BadRequest(f"{what} must be a whole number")
    if kind == "number" and type(value) not in (int, float):
        raise BadRequest(f"{what} must be a number")
    if kind == "array" and not isinstance(value, list):
        raise BadRequest(f"{what} must be a JSON array")
    if kind == "object" and not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def definition_of(row: FeatureRow, position: int) -> dict[str, Any]:
    """The feature definition of a row (400 naming the row when a field cannot be read)."""
    label = f"feature {row.name!r}" if row.name else f"row {position}"
    if row.type == "other":
        schema = _json(row.schema, f"{label}: the JSON schema") if row.schema.strip() else {}
    else:
        schema = {"type": row.type}
        values = [v.strip() for v in row.values.split("\n") if v.strip()]
        if values:
            if row.type not in ("string", "integer", "number"):
                raise BadRequest(f"{label}: allowed values apply to string, integer and number features")
            schema["enum"] = [_typed(v, row.type, f"{label}: allowed value {v!r}") for v in values]
        for bound in ("minimum", "maximum"):
            text = getattr(row, bound)
            if text:
                if row.type not in ("integer", "number"):
                    raise BadRequest(f"{label}: {bound} applies to integer and number features")
                schema[bound] = _typed(text, "number", f"{label}: {bound}")
        if row.default != "":
            schema["default"] = _typed(row.default, row.type, f"{label}: default")
    definition: dict[str, Any] = {"name": row.name, "json_schema": schema, "mandatory": row.mandatory}
    if row.extra:
        extra = _json(row.extra, f"{label}: the extra keys")
        if not isinstance(extra, dict):
            raise BadRequest(f"{label}: the extra keys must be a JSON object")
        definition.update({k: v for k, v in extra.items() if k not in _DEFINITION_KEYS})
    return definition


def definitions_of(rows: list[FeatureRow]) -> list[dict[str, Any]]:
    """The definitions of the rows kept (neither marked for removal nor left blank)."""
    kept = [row for row in rows if not row.remove and not row.blank()]
    return [definition_of(row, position) for position, row in enumerate(kept, start=1)]


# -- changes between two sets of definitions (the preview) --------------------------------------------


@dataclass
class FeatureChange:
    name: str
    change: str  # added | removed | changed | unchanged
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    details: list[str] = field(default_factory=list)


def changes_between(before: list[Any], after: list[Any]) -> list[FeatureChange]:
    """Feature by feature (in the new order, then the removed ones): what a replacement does."""
    old = {d.get("name"): d for d in before if isinstance(d, dict)}
    new = {d.get("name"): d for d in after if isinstance(d, dict)}
    out = []
    for name, definition in new.items():
        previous = old.get(name)
        if previous is None:
            out.append(FeatureChange(str(name), "added", after=definition))
            continue
        details = []
        if previous.get("json_schema") != definition.get("json_schema"):
            details.append("value schema")
        if bool(previous.get("mandatory")) != bool(definition.get("mandatory")):
            details.append("now mandatory" if definition.get("mandatory") else "now optional")
        extra_before = {k: v for k, v in previous.items() if k not in _DEFINITION_KEYS}
        extra_after = {k: v for k, v in definition.items() if k not in _DEFINITION_KEYS}
        if extra_before != extra_after:
            details.append("other keys")
        out.append(FeatureChange(str(name), "changed" if details else "unchanged", previous, definition, details))
    out.extend(FeatureChange(str(name), "removed", before=d) for name, d in old.items() if name not in new)
    return out


def fingerprint(value: Any) -> str:
    """A stable text of a JSON value, to tell whether it changed since a page showed it."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- feature values of services ---------------------------------------------------------------------------


def stringy(schema: Any) -> bool:
    """Whether a feature's values are text (typed into a field as they are, no quotes)."""
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "string":
        return True
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return all(isinstance(v, str) for v in schema["enum"])
    return isinstance(schema.get("const"), str)


def value_text(value: Any, schema: Any) -> str:
    """How a stored feature value is shown in a field."""
    if isinstance(value, str) and stringy(schema):
        return value
    return json.dumps(value, ensure_ascii=False)


def feature_value(text: str, schema: Any) -> Any:
    """A typed feature value: the text itself for a text feature; otherwise the JSON it reads as
    (``3``, ``true``, ``[1, 2]``, ``"spot"``), else the text (whose check then names it)."""
    if stringy(schema):
        return text
    try:
        return json_loads_strict(text)
    except ValueError:
        return text


def same_instant(text: str, stored: datetime | None) -> bool:
    """Whether a ``datetime-local`` value (UTC; with or without seconds) is the stored instant
    to the second (the field shows no fractions). Unreadable text is never the same: it is sent,
    and the API's check names it."""
    if stored is None:
        return False
    try:
        typed = datetime.fromisoformat(text)
    except ValueError:
        return False
    typed = typed.replace(tzinfo=timezone.utc) if typed.tzinfo is None else typed.astimezone(timezone.utc)
    return typed.replace(microsecond=0) == stored.astimezone(timezone.utc).replace(microsecond=0)


def local_input(value: datetime | None) -> str:
    """A stored date-time as a ``datetime-local`` input shows it (UTC, seconds)."""
    if value is None:
        return ""
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")
