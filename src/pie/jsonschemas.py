"""JSON Schema Draft 2020-12 helpers shared by feature definitions and handler contracts.

Schemas come from API callers, so references are resolved offline only: against the schema
itself and the bundled JSON Schema meta-schemas, never fetched over the network (jsonschema's
default registry would retrieve ``http(s)`` references, a server-side request forgery).
A reference that cannot be resolved that way makes the schema invalid.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema_specifications import REGISTRY as _META_SCHEMAS
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef")


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
def _validator(schema_json: str) -> Draft202012Validator:
    # the offline registry: a reference is never retrieved over the network
    return Draft202012Validator(json.loads(schema_json), registry=_META_SCHEMAS)


def validator_for(schema: Any) -> Draft202012Validator:
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
    if not errors:
        return None
    err: ValidationError = errors[0]
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{err.message}" + (f" (at /{where})" if where else "")
