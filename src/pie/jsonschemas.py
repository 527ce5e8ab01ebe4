"""JSON Schema Draft 2020-12 helpers shared by feature definitions and handler contracts."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError


def schema_error(schema: Any) -> str | None:
    """None when ``schema`` is a valid Draft 2020-12 schema, else a short reason."""
    if not isinstance(schema, (dict, bool)):
        return "a JSON Schema must be an object or a boolean"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


@lru_cache(maxsize=4096)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def validator_for(schema: Any) -> Draft202012Validator:
    """A compiled validator, cached by the schema's canonical JSON."""
    return _validator(json.dumps(schema, sort_keys=True, separators=(",", ":")))


def validation_error(schema: Any, value: Any) -> str | None:
    """None when ``value`` validates against ``schema``, else the best error's message."""
    validator = validator_for(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: (len(list(e.path)), e.message))
    if not errors:
        return None
    err: ValidationError = errors[0]
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{err.message}" + (f" (at /{where})" if where else "")
