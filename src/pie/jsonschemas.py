"""JSON Schema Draft 2020-12 helpers shared by feature definitions and handler contracts.

Schemas come from API callers, so references are resolved offline only: against the schema
itself and the bundled JSON Schema meta-schemas, never fetched over the network (jsonschema's
default registry would retrieve ``http(s)`` references, a server-side request forgery).
A reference that cannot be resolved that way makes the schema invalid.

Patterns (``pattern``, ``patternProperties``, and ``additionalProperties`` next to them) are
evaluated with a time limit: a caller-supplied regex such as ``^(a|aa)+$`` backtracks
exponentially, and with Python's ``re`` one crafted value would freeze the whole process. A
pattern that exceeds the limit on a value counts as a validation failure (fail closed).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import jsonschema._utils as _jsonschema_utils
import regex as _regex
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema_specifications import REGISTRY as _META_SCHEMAS
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef")

PATTERN_TIMEOUT_SECONDS = 0.1


class PatternTooExpensive(Exception):
    """A pattern took longer than ``PATTERN_TIMEOUT_SECONDS`` on one value."""


@lru_cache(maxsize=4096)
def _compiled_pattern(pattern: str) -> Any:
    return _regex.compile(pattern)


def pattern_search(pattern: str, text: str) -> bool:
    """``re.search(pattern, text) is not None``, bounded in time (``PatternTooExpensive``)."""
    try:
        return _compiled_pattern(pattern).search(text, timeout=PATTERN_TIMEOUT_SECONDS) is not None
    except TimeoutError as exc:
        raise PatternTooExpensive(pattern) from exc


def _too_expensive(pattern: str) -> ValidationError:
    return ValidationError(f"pattern {pattern!r} is too expensive to evaluate on this value")


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "string"):
        return
    try:
        if not pattern_search(pattern, instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")
    except PatternTooExpensive:
        yield _too_expensive(pattern)


def _pattern_properties(validator: Any, pattern_properties: dict, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            try:
                matched = pattern_search(pattern, key)
            except PatternTooExpensive:
                yield _too_expensive(pattern)
                continue
            if matched:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = []
    for key in instance:
        if key in properties:
            continue
        try:
            if any(pattern_search(p, key) for p in patterns):
                continue
        except PatternTooExpensive as exc:
            yield _too_expensive(str(exc))
            return
        extras.append(key)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(e) for e in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


class _BoundedRe:
    """Stands in for the ``re`` module inside ``jsonschema._utils``, whose
    ``find_evaluated_property_keys_by_schema`` (behind ``unevaluatedProperties``) matches
    ``patternProperties`` with ``re.search`` — the one pattern path the keyword overrides below
    cannot reach. Its ``search`` is time-bounded like ``pattern_search``; everything else is ``re``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def search(pattern: str, string: str, flags: int = 0) -> Any:
        if flags:
            return re.search(pattern, string, flags)
        try:
            return _compiled_pattern(pattern).search(string, timeout=PATTERN_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            raise PatternTooExpensive(pattern) from exc


_jsonschema_utils.re = _BoundedRe()


# Draft 2020-12 with time-bounded pattern keywords
_Validator = validators.extend(
    Draft202012Validator,
    {"pattern": _pattern, "patternProperties": _pattern_properties, "additionalProperties": _additional_properties},
)


def unresolvable_reference(schema: Any) -> str | None:
    """None when every ``$ref``/``$dynamicRef`` in ``schema`` resolves offline (inside the schema
    or to a bundled meta-schema), else a short reason naming the first one that does not."""
    if not isinstance(schema, dict):
        return None
    root = DRAFT202012.create_resource(schema)
    stack = [(root, _META_SCHEMAS.resolver_with_root(root))]
    while stack:
        resource, resolver = stack.pop()
        contents = resource.contents
        if isinstance(contents, dict):
            for keyword in _REFERENCE_KEYWORDS:
                ref = contents.get(keyword)
                if isinstance(ref, str):
                    try:
                        resolver.lookup(ref)
                    except Unresolvable:
                        return (
                            f"{keyword} {ref!r} cannot be resolved (only references inside the schema "
                            "or to the JSON Schema meta-schemas are supported)"
                        )
        for sub in resource.subresources():
            stack.append((sub, resolver.in_subresource(sub)))
    return None


def schema_error(schema: Any) -> str | None:
    """None when ``schema`` is a valid Draft 2020-12 schema whose references all resolve
    offline, else a short reason."""
    if not isinstance(schema, (dict, bool)):
        return "a JSON Schema must be an object or a boolean"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return unresolvable_reference(schema)


@lru_cache(maxsize=4096)
def _validator(schema_json: str) -> Any:
    # the offline registry: a reference is never retrieved over the network
    return _Validator(json.loads(schema_json), registry=_META_SCHEMAS)


def validator_for(schema: Any) -> Any:
    """A compiled validator, cached by the schema's canonical JSON."""
    return _validator(json.dumps(schema, sort_keys=True, separators=(",", ":")))


def validation_error(schema: Any, value: Any) -> str | None:
    """None when ``value`` validates against ``schema``, else the best error's message. A value
    that cannot be validated at all (a reference that does not resolve, an integer too large to
    compare with a float ``multipleOf``, nesting too deep) is reported as invalid, not raised."""
    validator = validator_for(schema)
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: (len(list(e.path)), e.message))
    except Unresolvable as exc:
        return f"the schema cannot be applied: unresolvable reference ({exc})"
    except OverflowError:
        return "a number is too large to be checked against the schema"
    except RecursionError:
        return "the value is nested too deeply to be checked against the schema"
    except PatternTooExpensive as exc:
        return f"pattern {exc} is too expensive to evaluate on this value"
    if not errors:
        return None
    err: ValidationError = errors[0]
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{err.message}" + (f" (at /{where})" if where else "")


# handler contracts (``handler_contracts`` of a model version): {action: {input_schema, output_schema}}
def input_schema(contracts: dict[str, Any] | None, action: str) -> Any | None:
    """The contract ``input_schema`` for ``action`` (None when there is none)."""
    if not contracts:
        return None
    return (contracts.get(action) or {}).get("input_schema")


def input_problem(contracts: dict[str, Any] | None, action: str, value: Any, model_id: str, version: str) -> str | None:
    """Why ``value`` does not match the ``action`` ``input_schema`` of model ``model_id`` version
    ``version`` (the 422 message), or None (it matches, or there is no such schema)."""
    schema = input_schema(contracts, action)
    if schema is None:
        return None
    error = validation_error(schema, value)
    if error is None:
        return None
    return f"input does not match the {action} input_schema of model {model_id} version {version}: {error}"


def contract_schema(contracts: dict[str, Any] | None, action: str, field: str) -> Any | None:
    if not contracts:
        return None
    return (contracts.get(action) or {}).get(field)
