"""Names for the OpenAPI document's inline enums and unions, so generated clients are typed
cleanly (one ``AssignmentStatus`` enum instead of ``AssignmentCreateStatus``,
``AssignmentUpsertStatus``, ...; one ``Handler`` union instead of an anonymous one per field).

Pydantic renders ``Literal[...]`` fields and ``X | Y`` unions inline; the request and response
models stay as they are (plain strings validated as literals), and only the document names them.
"""

from __future__ import annotations

import json
from typing import Any

REF = "#/components/schemas/"

# value set (sorted) -> component name; a set not listed is named after where it first occurs
ENUM_NAMES: dict[tuple[str, ...], str] = {
    ("active", "archived"): "AssignmentStatus",
    ("inference", "training"): "JobType",
    ("active", "suspended"): "ClientStatus",
    ("active", "inactive"): "DomainStatus",
    ("degraded", "ok"): "HealthStatus",
    ("ok", "unavailable"): "DatabaseStatus",
    ("failure", "success"): "JobOutcome",
    ("inference_complete", "training_complete"): "TriggerEvent",
    ("stored", "trigger_output"): "InputSource",
    ("active", "paused"): "SubscriptionSettableStatus",
    ("active", "archived", "failed", "pending", "training"): "VersionStatus",
    ("failure", "pending", "started", "success"): "JobStatus",
    ("primary", "shadow", "split"): "ExperimentArm",
}

JSON_SCHEMA_COMPONENT = {
    "title": "JsonSchema",
    "description": "A JSON Schema (Draft 2020-12): an object, or a boolean (true accepts anything, false nothing).",
    "anyOf": [{"type": "object", "additionalProperties": True}, {"type": "boolean"}],
}


def _camel(*parts: str) -> str:
    return "".join(word[:1].upper() + word[1:] for part in parts for word in part.replace("-", "_").split("_"))


def name_inline_schemas(document: dict[str, Any]) -> dict[str, Any]:
    """Hoist inline string enums and the handler / JSON-Schema unions into named components
    (in place; returns ``document``)."""
    components: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})

    def enum_ref(node: dict[str, Any], context: str) -> dict[str, Any]:
        values = tuple(sorted(node["enum"]))
        name = ENUM_NAMES.get(values) or _camel(context)
        existing = components.get(name)
        if existing is not None and tuple(sorted(existing.get("enum", ()))) != values:
            name = _camel(context)
        components.setdefault(name, {"type": "string", "enum": list(node["enum"]), "title": name})
        ref: dict[str, Any] = {"$ref": REF + name}
        for key in ("title", "description", "default", "examples"):
            if key in node:
                ref[key] = node[key]
        return ref

    def union_ref(alternatives: list[Any], node: dict[str, Any]) -> str | None:
        non_null = [a for a in alternatives if a != {"type": "null"}]
        refs = sorted(a.get("$ref", "") for a in non_null if isinstance(a, dict))
        if len(non_null) > 1 and all(r.startswith(REF) and r.endswith("Handler") for r in refs):
            components.setdefault(
                "Handler",
                {
                    "title": "Handler",
                    "description": "Where a job runs: an AWS Lambda function, an ECS task or an in-process implementation.",
                    "oneOf": [{"$ref": r} for r in sorted(refs)],
                    **({"discriminator": node["discriminator"]} if "discriminator" in node else {}),
                },
            )
            return "Handler"
        if json.dumps(non_null, sort_keys=True) == json.dumps(JSON_SCHEMA_COMPONENT["anyOf"], sort_keys=True):
            components.setdefault("JsonSchema", JSON_SCHEMA_COMPONENT)
            return "JsonSchema"
        return None

    def walk(node: Any, context: str) -> Any:
        if isinstance(node, list):
            return [walk(item, context) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("enum"), list) and len(node["enum"]) > 1 and node.get("type") == "string":
            return enum_ref(node, context)
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                name = union_ref(node[key], node)
                if name is not None:
                    nullable = {"type": "null"} in node[key]
                    rest = {k: v for k, v in node.items() if k not in (key, "discriminator")}
                    if nullable:
                        return {**rest, "anyOf": [{"$ref": REF + name}, {"type": "null"}]}
                    return {**rest, "$ref": REF + name}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {prop: walk(schema, f"{context}_{prop}") for prop, schema in value.items()}
            else:
                out[key] = walk(value, context)
        return out

    for name in list(components):
        schema = components[name]
        if isinstance(schema.get("enum"), list):
            continue  # already a named enum
        components[name] = walk(schema, name)
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                if "schema" in parameter:
                    parameter["schema"] = walk(
                        parameter["schema"], f"{operation.get('operationId', '')}_{parameter.get('name', '')}"
                    )
    return document
