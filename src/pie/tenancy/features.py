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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pie.errors import Unprocessable
from pie.jsonschemas import PatternTooExpensive, pattern_search, schema_error, validation_error

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


# -- a fast validity check for the common subset of JSON Schema -----------------------------------
#
# Checking tens of thousands of services validates thousands of distinct values; jsonschema's
# general-purpose validator costs ~100 us per array value. ``compile_check`` turns a schema that
# uses only the keywords below into a plain Python predicate with jsonschema's (Draft 2020-12)
# semantics. It is only ever trusted to say "valid": a value it rejects, and every schema it does
# not support (``$ref``, ``if``, ``uniqueItems``, ...), go to jsonschema, which stays the source of
# truth and of the failure messages. tests/test_features_resolver.py checks it against jsonschema.

Check = Callable[[Any], bool]

_IGNORED = frozenset(
    {
        "$schema",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
    }
)
_TYPE_TESTS: dict[str, Check] = {
    "null": lambda v: v is None,
    "boolean": lambda v: v is True or v is False,
    "integer": lambda v: (type(v) is int) or (type(v) is float and v.is_integer()),
    "number": lambda v: type(v) is int or type(v) is float,
    "string": lambda v: type(v) is str,
    "array": lambda v: type(v) is list,
    "object": lambda v: type(v) is dict,
}


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality as jsonschema's ``enum``/``const`` see it: booleans are not numbers,
    ``1 == 1.0``, containers compared element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if type(a) in (int, float) and type(b) in (int, float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def compile_check(schema: Any) -> Check | None:
    """A predicate equivalent to ``Draft202012Validator(schema).is_valid``, or None when the
    schema uses a keyword outside the supported subset."""
    if schema is True:
        return lambda v: True
    if schema is False:
        return lambda v: False
    if not isinstance(schema, dict):
        return None
    tests: list[Check] = []
    for keyword, arg in schema.items():
        if keyword in _IGNORED:
            continue
        test = _compile_keyword(keyword, arg, schema)
        if test is None:
            return None
        if test is not _NO_TEST:
            tests.append(test)
    return _conjunction(tests)


def _conjunction(tests: list[Check]) -> Check:
    """All of ``tests``, without per-call generator overhead for the usual short lists."""
    if not tests:
        return lambda v: True
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        first, second = tests
        return lambda v: first(v) and second(v)
    if len(tests) == 3:
        first, second, third = tests
        return lambda v: first(v) and second(v) and third(v)
    head, rest = tests[0], _conjunction(tests[1:])
    return lambda v: head(v) and rest(v)


def _NO_TEST(value: Any) -> bool:  # marker: keyword handled by a sibling (e.g. prefixItems by items)
    return True


def _is_num(v: Any) -> bool:
    return type(v) is int or type(v) is float


def _compile_keyword(keyword: str, arg: Any, schema: dict[str, Any]) -> Check | None:
    if keyword == "type":
        names = [arg] if isinstance(arg, str) else arg
        if not isinstance(names, list) or not names or any(n not in _TYPE_TESTS for n in names):
            return None
        type_tests = [_TYPE_TESTS[n] for n in names]
        return type_tests[0] if len(type_tests) == 1 else (lambda v: any(t(v) for t in type_tests))
    if keyword == "enum":
        if not isinstance(arg, list):
            return None
        return lambda v: any(_json_equal(v, option) for option in arg)
    if keyword == "const":
        return lambda v: _json_equal(v, arg)
    if keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if not _is_num(arg):
            return None
        if keyword == "minimum":
            return lambda v: not _is_num(v) or v >= arg
        if keyword == "maximum":
            return lambda v: not _is_num(v) or v <= arg
        if keyword == "exclusiveMinimum":
            return lambda v: not _is_num(v) or v > arg
        return lambda v: not _is_num(v) or v < arg
    if keyword in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        if type(arg) is not int:
            return None
        kind = {"Length": str, "Items": list, "Properties": dict}[keyword[3:]]
        if keyword.startswith("min"):
            return lambda v: type(v) is not kind or len(v) >= arg
        return lambda v: type(v) is not kind or len(v) <= arg
    if keyword == "pattern":
        if not isinstance(arg, str):
            return None
        try:
            re.compile(arg)
        except re.error:
            return None

        def matches(v: Any) -> bool:
            if type(v) is not str:
                return True
            try:
                return pattern_search(arg, v)
            except PatternTooExpensive:
                return False  # not known valid: jsonschema judges (and reports) it

        return matches
    if keyword == "prefixItems":
        if "items" in schema:
            return _NO_TEST  # compiled together with items
        return _compile_items(arg, None)
    if keyword == "items":
        return _compile_items(schema.get("prefixItems"), arg)
    if keyword in ("properties", "additionalProperties"):
        if keyword == "additionalProperties" and "properties" in schema:
            return _NO_TEST
        if "patternProperties" in schema:
            return None
        return _compile_properties(schema.get("properties"), schema.get("additionalProperties", True))
    if keyword == "required":
        if not isinstance(arg, list) or not all(isinstance(k, str) for k in arg):
            return None
        return lambda v: type(v) is not dict or all(k in v for k in arg)
    if keyword in ("oneOf", "anyOf", "allOf"):
        if not isinstance(arg, list) or not arg:
            return None
        compiled = [compile_check(s) for s in arg]
        subs = [s for s in compiled if s is not None]
        if len(subs) != len(compiled):
            return None
        if keyword == "anyOf":
            return lambda v: any(s(v) for s in subs)
        if keyword == "allOf":
            return lambda v: all(s(v) for s in subs)
        return lambda v: sum(1 for s in subs if s(v)) == 1
    if keyword == "not":
        sub = compile_check(arg)
        return None if sub is None else (lambda v: not sub(v))
    return None


def _compile_items(prefix: Any, rest: Any) -> Check | None:
    prefix_checks: list[Check] = []
    if prefix is not None:
        if not isinstance(prefix, list):
            return None
        for sub_schema in prefix:
            sub = compile_check(sub_schema)
            if sub is None:
                return None
            prefix_checks.append(sub)
    rest_check = None
    if rest is not None:
        rest_check = compile_check(rest)
        if rest_check is None:
            return None
    n = len(prefix_checks)

    def check(v: Any) -> bool:
        if type(v) is not list:
            return True
        for item, sub in zip(v, prefix_checks):
            if not sub(item):
                return False
        if rest_check is not None:
            for item in v[n:]:
                if not rest_check(item):
                    return False
        return True

    return check


def _compile_properties(properties: Any, additional: Any) -> Check | None:
    checks: dict[str, Check] = {}
    if properties is not None:
        if not isinstance(properties, dict):
            return None
        for key, sub_schema in properties.items():
            sub = compile_check(sub_schema)
            if sub is None:
                return None
            checks[key] = sub
    extra = compile_check(additional)
    if extra is None:
        return None

    def check(v: Any) -> bool:
        if type(v) is not dict:
            return True
        for key, item in v.items():
            sub = checks.get(key)
            if not (sub(item) if sub is not None else extra(item)):
                return False
        return True

    return check


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
        self.by_name = {d["name"]: d for d in self.definitions}
        self._memo: dict[tuple[str, Any], str | None] = {}
        self._fast: dict[str, Check | None] = {d["name"]: compile_check(d["json_schema"]) for d in self.definitions}

    def _check(self, definition: dict[str, Any], value: Any) -> str | None:
        name = definition["name"]
        key = (name, _memo_key(value))
        try:
            return self._memo[key]
        except KeyError:
            fast = self._fast.get(name)
            if fast is not None and fast(value):
                result = None
            else:  # jsonschema decides (and explains) everything the fast check does not accept
                result = validation_error(definition["json_schema"], value)
            self._memo[key] = result
            return result

    def check(self, name: str, value: Any, *, memo: bool = True) -> str | None:
        """None when ``value`` is valid for the feature ``name``, else the reason. ``memo=False``
        for callers that already hold distinct values (skips computing the memo key)."""
        if memo:
            return self._check(self.by_name[name], value)
        fast = self._fast.get(name)
        if fast is not None and fast(value):
            return None
        return validation_error(self.by_name[name]["json_schema"], value)

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
