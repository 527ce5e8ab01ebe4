"""Feature definitions and the feature resolver (spec 5.2 and 5.4). Pure: no database.

A definition is ``{"name": str, "json_schema": <Draft 2020-12 schema>, "mandatory": bool}``.
Resolving a service's provided features against a set of definitions, feature by feature:
the provided value if the key is present, else the schema's ``default`` if it has one, else a
failure when ``mandatory`` (the feature is left out otherwise). Every value obtained is validated
against its schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pie.errors import Unprocessable
from pie.jsonschemas import schema_error, validation_error

FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MISSING = object()


@dataclass(frozen=True)
class FeatureFailure:
    feature: str
    value: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "value": self.value, "reason": self.reason}

    def describe(self) -> str:
        return f"feature {self.feature!r} (value {json.dumps(self.value)}): {self.reason}"


def definition_problems(definitions: Any) -> list[str]:
    """Every reason the set is invalid (empty list: valid)."""
    if not isinstance(definitions, list):
        return ["features must be a list of definitions"]
    problems: list[str] = []
    seen: set[str] = set()
    for index, definition in enumerate(definitions):
        if not isinstance(definition, dict):
            problems.append(f"definition #{index} is not an object")
            continue
        name = definition.get("name")
        label = repr(name) if isinstance(name, str) else f"#{index}"
        if not isinstance(name, str) or not FEATURE_NAME.match(name):
            problems.append(f"feature {label}: name must match {FEATURE_NAME.pattern}")
        elif name in seen:
            problems.append(f"feature {label}: name repeats")
        else:
            seen.add(name)
        if "mandatory" in definition and not isinstance(definition["mandatory"], bool):
            problems.append(f"feature {label}: mandatory must be a boolean")
        schema = definition.get("json_schema", _MISSING)
        if schema is _MISSING:
            problems.append(f"feature {label}: json_schema is required")
            continue
        if not isinstance(schema, dict):
            problems.append(f"feature {label}: json_schema must be an object")
            continue
        error = schema_error(schema)
        if error is not None:
            problems.append(f"feature {label}: json_schema is not a valid Draft 2020-12 schema: {error}")
            continue
        if "default" in schema:
            error = validation_error(schema, schema["default"])
            if error is not None:
                problems.append(f"feature {label}: default does not validate against its schema: {error}")
    return problems


def validate_feature_definitions(definitions: Any) -> list[dict[str, Any]]:
    """Normalised definitions (``mandatory`` defaulted to false), or 422 naming the culprit."""
    problems = definition_problems(definitions)
    if problems:
        raise Unprocessable("invalid feature definitions: " + "; ".join(problems))
    # documented fields first; any extra keys (e.g. a description) are kept as sent
    return [
        {
            "name": d["name"],
            "json_schema": d["json_schema"],
            "mandatory": bool(d.get("mandatory", False)),
            **{k: v for k, v in d.items() if k not in ("name", "json_schema", "mandatory")},
        }
        for d in definitions
    ]


def describe_failures(failures: Iterable[FeatureFailure], *, limit: int = 10) -> str:
    """One human-readable line naming each failing feature, its value and the reason."""
    failures = list(failures)
    text = "; ".join(f.describe() for f in failures[:limit])
    if len(failures) > limit:
        text += f"; and {len(failures) - limit} more"
    return text


_SCALARS = (str, int, float, bool, type(None))


def _memo_key(value: Any) -> Any:
    """A hashable identity for a JSON value: scalars by (type, value) (so ``True``, ``1`` and
    ``1.0`` stay distinct), containers by their canonical JSON."""
    if type(value) in _SCALARS:
        return (type(value), value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Resolver:
    """Resolves provided features against one set of definitions. Validation results are
    memoised per (feature, value), so checking thousands of services validates each distinct
    value once."""

    def __init__(self, definitions: Iterable[dict[str, Any]]):
        self.definitions = list(definitions)
        self.names = {d["name"] for d in self.definitions}
        self._memo: dict[tuple[str, Any], str | None] = {}

    def _check(self, definition: dict[str, Any], value: Any) -> str | None:
        key = (definition["name"], _memo_key(value))
        try:
            return self._memo[key]
        except KeyError:
            result = self._memo[key] = validation_error(definition["json_schema"], value)
            return result

    @property
    def validations(self) -> int:
        """How many distinct (feature, value) pairs were actually validated."""
        return len(self._memo)

    def resolve(
        self, provided: dict[str, Any], *, unknown: Literal["reject", "ignore"] = "reject"
    ) -> tuple[dict[str, Any], list[FeatureFailure]]:
        resolved: dict[str, Any] = {}
        failures: list[FeatureFailure] = []
        for definition in self.definitions:
            name = definition["name"]
            schema = definition["json_schema"]
            if name in provided:
                value = provided[name]
            elif isinstance(schema, dict) and "default" in schema:
                value = schema["default"]
            elif definition.get("mandatory"):
                failures.append(FeatureFailure(name, None, "missing mandatory feature"))
                continue
            else:
                continue
            error = self._check(definition, value)
            if error is not None:
                failures.append(FeatureFailure(name, value, error))
            else:
                resolved[name] = value
        if unknown == "reject":
            for key in provided:
                if key not in self.names:
                    failures.append(FeatureFailure(key, provided[key], "unknown feature (not in the schema)"))
        return resolved, failures


def resolve_features(
    provided: dict[str, Any], definitions: Iterable[dict[str, Any]], *, unknown: Literal["reject", "ignore"] = "reject"
) -> tuple[dict[str, Any], list[FeatureFailure]]:
    return Resolver(definitions).resolve(provided, unknown=unknown)


def merge_patch(provided: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Shallow merge; a key set to null removes it."""
    merged = dict(provided)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged
