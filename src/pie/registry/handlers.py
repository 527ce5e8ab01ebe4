"""Handlers and handler contracts of a model (spec 7.1): semantic checks and staleness.

Pydantic (``pie.registry.schemas``) checks the JSON shape (400); this module checks what the
values mean (422): a real Lambda function ARN, a ``cluster/taskdef`` ECS target, a registered
in-process implementation, and valid Draft 2020-12 contract schemas.
"""

from __future__ import annotations

import re
from typing import Any

from pie.dispatch.inprocess import registered_names
from pie.errors import Unprocessable
from pie.jsonschemas import contract_schema, input_schema, schema_error

ACTIONS = ("training", "inference")

# arn:<partition>:lambda:<region>:<account>:function:<name>[:<qualifier>]
LAMBDA_ARN = re.compile(
    r"^arn:aws(?:-[a-z]+)*:lambda:[a-z]{2}(?:-[a-z]+)+-\d+:\d{12}:function:"
    r"(?P<name>[A-Za-z0-9_-]{1,64})(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]{1,128}))?$"
)
LAMBDA_QUALIFIER = re.compile(r"^(?:\$LATEST|[A-Za-z0-9_-]{1,128})$")
ECS_CLUSTER = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
ECS_TASK_DEFINITION = re.compile(r"^[A-Za-z0-9_-]{1,255}(?::[1-9][0-9]{0,9})?$")
ECS_CONTAINER = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def handler_problem(handler: dict[str, Any]) -> str | None:
    """Why one handler (already shape-checked) is malformed, or None."""
    kind = handler.get("type")
    if kind == "lambda":
        arn = handler.get("arn", "")
        match = LAMBDA_ARN.match(arn)
        if match is None:
            return (
                f"arn {arn!r} is not a Lambda function ARN "
                "(arn:aws:lambda:<region>:<12-digit account>:function:<name>[:<qualifier>])"
            )
        version = handler.get("version")
        if version is not None:
            if not LAMBDA_QUALIFIER.match(version):
                return f"version {version!r} is not a Lambda version or alias name"
            if match.group("qualifier") is not None:
                return "the qualifier is given twice (in the arn and as version); give it once"
        return None
    if kind == "ecs_task":
        value = handler.get("value", "")
        cluster, sep, task_definition = value.partition("/")
        if not sep or not ECS_CLUSTER.match(cluster) or not ECS_TASK_DEFINITION.match(task_definition):
            return (
                f"value {value!r} is not '<cluster>/<task_definition>' "
                "(cluster short name without '/', task definition 'family' or 'family:revision')"
            )
        container = handler.get("container")
        if container is not None and not ECS_CONTAINER.fullmatch(container):
            return f"container {container!r} is not an ECS container name (1-255 letters, digits, '_' and '-')"
        return None
    if kind == "in_process":
        value = handler.get("value", "")
        names = registered_names()
        if value not in names:
            return f"unknown in-process implementation {value!r} (registered: {', '.join(names) or 'none'})"
        return None
    return f"unknown handler type {kind!r}"


def validate_handlers(handlers: dict[str, dict[str, Any]]) -> None:
    problems = [f"{action}: {p}" for action in ACTIONS if (p := handler_problem(handlers[action])) is not None]
    if problems:
        raise Unprocessable("invalid handlers: " + "; ".join(problems))


def validate_contracts(contracts: dict[str, dict[str, Any]] | None) -> None:
    if not contracts:
        return
    problems: list[str] = []
    for action in ACTIONS:
        for field in ("input_schema", "output_schema"):
            schema = (contracts.get(action) or {}).get(field)
            if schema is None:
                continue
            error = schema_error(schema)
            if error is not None:
                problems.append(f"{action}.{field} is not a valid Draft 2020-12 schema: {error}")
    if problems:
        raise Unprocessable("invalid handler_contracts: " + "; ".join(problems))


def stale_actions(
    old_handlers: dict[str, Any],
    old_contracts: dict[str, Any] | None,
    new_handlers: dict[str, Any],
    new_contracts: dict[str, Any] | None,
) -> list[str]:
    """The actions whose subscriptions TARGETING the model go stale (spec 7.1 "Staleness").

    With contracts (before or after the update) staleness follows the contract ``input_schema``
    of the action (what the subscription's input must fit); a model without contracts on either
    side falls back to its handler."""
    changed: list[str] = []
    for action in ACTIONS:
        if old_contracts or new_contracts:
            if input_schema(old_contracts, action) != input_schema(new_contracts, action):
                changed.append(action)
        elif old_handlers.get(action) != new_handlers.get(action):
            changed.append(action)
    return changed


# the event a completed job of each action fires
COMPLETION_EVENT = {"training": "training_complete", "inference": "inference_complete"}


def stale_output_events(old_contracts: dict[str, Any] | None, new_contracts: dict[str, Any] | None) -> list[str]:
    """The trigger events whose ``trigger_output`` subscriptions FROM the model go stale: the
    contract ``output_schema`` of the action completing changed, so the output they feed on
    to their target has a new shape (the docs: staleness follows the contract schemas)."""
    return [
        COMPLETION_EVENT[action]
        for action in ACTIONS
        if contract_schema(old_contracts, action, "output_schema")
        != contract_schema(new_contracts, action, "output_schema")
    ]
