"""JSON with a known shape, put into words and table rows for the console's pages: feature
definitions, JSON Schemas, handlers, handler contracts, audit rows. Pure functions (no database,
no request), registered as template filters by ``pie.console.common``."""

from __future__ import annotations

import json
from typing import Any

ACTIONS = ("training", "inference")


def compact(value: Any) -> str:
    """A JSON value in one short line (strings without quotes)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _number(value: Any) -> str:
    return compact(value)


def _bounds(schema: dict[str, Any], low: str, high: str, unit: str = "") -> str | None:
    lo, hi = schema.get(low), schema.get(high)
    suffix = f" {unit}" if unit else ""
    if lo is not None and hi is not None:
        return f"{_number(lo)}–{_number(hi)}{suffix}"
    if lo is not None:
        return f"≥ {_number(lo)}{suffix}"
    if hi is not None:
        return f"≤ {_number(hi)}{suffix}"
    return None


def describe_schema(schema: Any) -> str:
    """A JSON Schema in a few words: ``integer 0–20``, ``one of "spot", "auction"``,
    ``array of 7 × number ≥ 0``, ``tuple (string, string)``, ``any of: ...``."""
    if schema is True or schema == {}:
        return "any value"
    if schema is False:
        return "no value"
    if not isinstance(schema, dict):
        return compact(schema)
    parts: list[str] = []
    kind = schema.get("type")
    if isinstance(kind, list):
        parts.append(" or ".join(str(k) for k in kind))
    elif isinstance(kind, str):
        if kind == "array" and isinstance(schema.get("prefixItems"), list):
            items = ", ".join(describe_schema(s) for s in schema["prefixItems"])
            parts.append(f"tuple ({items})")
        elif kind == "array":
            count = ""
            if schema.get("minItems") is not None and schema.get("minItems") == schema.get("maxItems"):
                count = f"{schema['minItems']} × "
            elif (bounds := _bounds(schema, "minItems", "maxItems", "items")) is not None:
                count = f"{bounds}: "
            item = describe_schema(schema["items"]) if "items" in schema else "any value"
            parts.append(f"array of {count}{item}")
        elif kind == "object" and isinstance(schema.get("properties"), dict):
            names = ", ".join(schema["properties"])
            parts.append(f"object ({names})")
        elif not (isinstance(schema.get("enum"), list) and kind in ("string", "integer", "number")):
            parts.append(kind)  # (the allowed values say the type)
    if "const" in schema:
        parts.append(f"exactly {compact(schema['const'])}")
    if isinstance(schema.get("enum"), list):
        parts.append("one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"]))
    numeric = _bounds(schema, "minimum", "maximum")
    if numeric:
        parts.append(numeric)
    if "exclusiveMinimum" in schema:
        parts.append(f"> {_number(schema['exclusiveMinimum'])}")
    if "exclusiveMaximum" in schema:
        parts.append(f"< {_number(schema['exclusiveMaximum'])}")
    length = _bounds(schema, "minLength", "maxLength", "characters")
    if length:
        parts.append(length)
    if isinstance(schema.get("pattern"), str):
        parts.append(f"matching {schema['pattern']}")
    for word in ("oneOf", "anyOf", "allOf"):
        if isinstance(schema.get(word), list):
            label = {"oneOf": "either", "anyOf": "any of", "allOf": "all of"}[word]
            parts.append(f"{label}: " + " | ".join(describe_schema(s) for s in schema[word]))
    if "$ref" in schema:
        parts.append(f"see {schema['$ref']}")
    return " ".join(parts) if parts else "schema " + compact(schema)


def feature_rows(definitions: Any) -> list[dict[str, Any]]:
    """One row per feature definition: name, type and constraints in words, default, mandatory."""
    rows: list[dict[str, Any]] = []
    for definition in definitions or []:
        if not isinstance(definition, dict):
            continue
        schema = definition.get("json_schema")
        default = None
        if isinstance(schema, dict):
            if "default" in schema:
                default = compact(schema["default"])
            described = describe_schema({k: v for k, v in schema.items() if k != "default"})
        else:
            described = describe_schema(schema)
        rows.append(
            {
                "name": definition.get("name"),
                "schema": described,
                "default": default,
                "mandatory": bool(definition.get("mandatory")),
            }
        )
    return rows


def _whole(value: Any) -> Any:
    """120.0 -> 120 (a float that is a whole number, as people write it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def handler_rows(handlers: Any) -> list[dict[str, Any]]:
    """One row per action: type, target (ARN, ECS cluster/task definition, in-process name),
    qualifier, time-out."""
    rows: list[dict[str, Any]] = []
    if not isinstance(handlers, dict):
        return rows
    for action in ACTIONS:
        handler = handlers.get(action)
        if not isinstance(handler, dict):
            continue
        kind = str(handler.get("type"))
        rows.append(
            {
                "action": action,
                "type": {"lambda": "AWS Lambda", "ecs_task": "ECS task", "in_process": "in-process"}.get(kind, kind),
                "target": handler.get("arn") if kind == "lambda" else handler.get("value"),
                "qualifier": handler.get("version") if kind == "lambda" else None,
                "container": handler.get("container"),
                "timeout": _whole(handler.get("timeout_seconds")),
            }
        )
    return rows


def schema_rows(schema: Any) -> list[dict[str, Any]]:
    """An object schema's properties as rows (name, schema in words, required); any other
    schema as one row without a name."""
    if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
        required = set(schema.get("required") or [])
        return [
            {"name": name, "schema": describe_schema(sub), "required": name in required}
            for name, sub in schema["properties"].items()
        ]
    return [{"name": None, "schema": describe_schema(schema), "required": None}]


def contract_rows(contracts: Any) -> list[dict[str, Any]]:
    """One row per (action, input or output) schema of a model's handler contracts."""
    rows: list[dict[str, Any]] = []
    if not isinstance(contracts, dict):
        return rows
    for action in ACTIONS:
        contract = contracts.get(action)
        if not isinstance(contract, dict):
            continue
        for field, label in (("input_schema", "input"), ("output_schema", "output")):
            if contract.get(field) is None:
                continue
            schema = contract[field]
            extra = isinstance(schema, dict) and schema.get("additionalProperties") is False
            rows.append({"action": action, "direction": label, "rows": schema_rows(schema), "closed": extra})
    return rows


def summary_rows(summary: Any) -> list[tuple[str, str]]:
    """An audit row's summary as (name, value) pairs, without the channel (``via``)."""
    if not isinstance(summary, dict):
        return []
    pairs = []
    for name, value in summary.items():
        if name == "via":
            continue
        if name == "fields" and isinstance(value, list):
            pairs.append(("fields", ", ".join(str(v) for v in value)))
        else:
            pairs.append((name, compact(value)))
    return pairs


# -- audit actions in words -------------------------------------------------------------------------


def _tail(target: str | None) -> str:
    return (target or "").rsplit("/", 1)[-1]


def _key_scope(target: str | None) -> tuple[str, str | None]:
    """(assignment key, service or None) of an assignment target id."""
    parts = (target or "").split("/")
    if len(parts) == 3:
        return parts[2], parts[1]
    return parts[-1], None


def action_words(record: Any) -> str:
    """What an audit row did, as a sentence: "Moved key default to version 3", "Suspended client
    acme", "Set version 2 of fares from training to active". Unknown operations (added by later
    releases) read as their operation id."""
    action = record.action
    target = record.target_id
    s = record.summary if isinstance(record.summary, dict) else {}
    fields = set(s.get("fields") or [])
    name = _tail(target)
    if action == "createclient":
        return f"Created client {target}"
    if action == "updateclient":
        said = []
        if s.get("status") == "suspended":
            said.append("suspended it")
        elif s.get("status") == "active":
            said.append("reactivated it")
        if "name" in s:
            said.append(f"renamed it {s['name']}")
        if "app_client_ids" in fields:
            said.append("changed its app client ids")
        return f"Updated client {target}" + (": " + ", ".join(said) if said else "")
    if action == "createdomain":
        return f"Created domain {target}"
    if action == "updatedomain":
        if s.get("status") in ("active", "inactive"):
            return f"{'Activated' if s['status'] == 'active' else 'Deactivated'} domain {target}"
        return f"Updated domain {target}"
    if action == "updatedomainfeatures":
        return f"Replaced the live features of domain {target}"
    if action == "initdomainservice":
        return f"Initialised service {name}"
    if action == "initalldomainservices":
        return f"Re-initialised every service of domain {target}"
    if action == "updatedomainservice":
        return f"Updated service {name}"
    if action in (
        "upsertdomainmodelassignment",
        "putdomainmodelassignment",
        "upsertservicemodelassignment",
        "putservicemodelassignment",
    ):
        key, service = _key_scope(target)
        where = f" of service {service}" if service else ""
        if s.get("status") == "archived":
            return f"Archived key {key}{where}"
        version = s.get("model_version")
        model = s.get("model_id")
        return f"Moved key {key}{where} to version {version}" + (f" of {model}" if model else "")
    if action in ("rundomainmodelassignmentjob", "runservicemodelassignmentjob"):
        kind = s.get("job_type") or "inference"
        return f"Launched a{'n' if kind == 'inference' else ''} {kind} job through an assignment key"
    if action == "createmodel":
        return f"Registered model {target}"
    if action == "updatemodel":
        return f"Updated model {target}"
    if action == "createmodelversion":
        model, _, version = (target or "").partition("/")
        return f"Created version {version} of {model}"
    if action == "setmodelversionstatus":
        model, _, version = (target or "").partition("/")
        if "from" in s:
            return f"Set version {version} of {model} from {s.get('from')} to {s.get('to')}"
        return f"Set the status of version {version} of {model} to {s.get('status')}"
    if action == "infermodelversion":
        return "Ran inference on a model version"
    if action == "createmodeleventsubscription":
        return f"Created an event subscription ({s.get('trigger_event', 'event')} → {s.get('target_action', 'job')})"
    if action == "updatemodeleventsubscription":
        if s.get("status") == "paused":
            return "Paused an event subscription"
        if s.get("status") == "active":
            return "Resumed an event subscription"
        return "Updated an event subscription"
    if action == "deletemodeleventsubscription":
        return "Deleted an event subscription"
    # the lifecycle operations (spec 15.4)
    if action == "reinitdomainservice":
        return f"Re-initialised service {name}"
    if action == "deletedomainservice":
        return f"Deleted service {name}"
    if action == "canceljob":
        return "Cancelled a job"
    if action == "retryjob":
        return "Retried a job"
    if action == "completemodeljob":
        return f"Reported the end of a job ({s.get('status', 'done')})"
    return action
