"""The payload of a job: what its handler receives (spec 9.2, 14.5), where it reports back, how
long its callback token lives, and whether the payload fits the handler type's size limit.
Built here so that creating a job (which refuses a payload too large for its handler) and
dispatching it (``pie.dispatch``) shape it the same way."""

from __future__ import annotations

import json
from typing import Any

from pie.config import Settings

# ECS caps the overrides structure at 8192 characters of JSON, formatting included (the payload
# sits in it as a string, so its quotes and backslashes count twice)
ECS_MAX_OVERRIDES_CHARS = 8192


def callback_url(settings: Settings, model_id: str, model_version: str, job_id: str) -> str:
    base = settings.public_url.rstrip("/")
    return f"{base}/v2/models/{model_id}/versions/{model_version}/jobs/{job_id}/complete"


def job_timeout(settings: Settings, handler: dict[str, Any] | None) -> float:
    """The time-out of a job run by ``handler``: its ``timeout_seconds``, else the global one."""
    value = (handler or {}).get("timeout_seconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return settings.job_timeout_seconds


def callback_token_ttl(settings: Settings, handler: dict[str, Any] | None) -> float:
    """A callback token outlives the job's time-out by ``PIE_CALLBACK_TOKEN_MARGIN_SECONDS``."""
    return job_timeout(settings, handler) + settings.callback_token_margin_seconds


def build_payload(settings: Settings, job: Any, callback_token: str | None = None) -> dict[str, Any]:
    """What every handler receives (spec 9.2, 14.5; ``domain_features`` only on the training
    jobs of domain assignments, spec 15.1)."""
    payload = {
        "job_id": job.job_id,
        "job_type": job.job_type,
        "model_id": job.model_id,
        "model_version": job.model_version,
        "assignment_id": str(job.assignment_id) if job.assignment_id is not None else None,
        "client_id": job.client_id,
        "domain_id": job.domain_id,
        "service_id": job.service_id,
        "input": job.input,
        "features": job.features,
        "callback_url": callback_url(settings, job.model_id, job.model_version, job.job_id),
    }
    # training jobs launched through a domain assignment: the domain's live features (spec 15.1)
    domain_features = getattr(job, "domain_features", None)
    if domain_features is not None:
        payload["domain_features"] = domain_features
    if callback_token is not None:
        payload["callback_token"] = callback_token
    return payload


def ecs_container(settings: Settings, handler: dict[str, Any] | None) -> str:
    """The container whose environment carries the payload: the handler's ``container``, else
    ``PIE_ECS_CONTAINER_NAME``."""
    container = (handler or {}).get("container")
    return container if isinstance(container, str) and container else settings.ecs_container_name


def ecs_overrides(settings: Settings, payload: dict[str, Any], container: str | None = None) -> dict[str, Any]:
    """The RunTask ``overrides``: the payload as JSON in the container's environment variable
    (``container``, default ``PIE_ECS_CONTAINER_NAME``)."""
    body = json.dumps(payload, separators=(",", ":"))
    return {
        "containerOverrides": [
            {
                "name": container or settings.ecs_container_name,
                "environment": [{"name": settings.ecs_payload_env_var, "value": body}],
            }
        ]
    }


def lambda_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def _json_size(value: Any) -> int:
    """Bytes of ``json.dumps(value).encode()``: the default ``ensure_ascii`` output is ASCII, so
    its length in characters is its length in bytes (no encoded copy of a large payload)."""
    return len(json.dumps(value))


def payload_limit_problem(settings: Settings, handler: dict[str, Any] | None, payload: dict[str, Any]) -> str | None:
    """Why ``payload`` cannot be handed to ``handler`` (its type's size limit), or None."""
    kind = (handler or {}).get("type")
    if kind == "ecs_task":
        size = len(
            json.dumps(ecs_overrides(settings, payload, ecs_container(settings, handler)), separators=(",", ":"))
        )
        if size > ECS_MAX_OVERRIDES_CHARS:
            return (
                f"the job payload makes the ECS container overrides {size} characters of JSON; "
                f"ECS allows at most {ECS_MAX_OVERRIDES_CHARS} (limit: ECS RunTask overrides)"
            )
    elif kind == "lambda":
        size = _json_size(payload)  # = len(lambda_payload(payload)), without the bytes copy
        if size > settings.lambda_max_payload_bytes:
            return (
                f"the job payload is {size} bytes; a Lambda Event invocation accepts at most "
                f"{settings.lambda_max_payload_bytes} (limit: PIE_LAMBDA_MAX_PAYLOAD_BYTES)"
            )
    elif kind == "in_process":
        size = _json_size(payload)
        if size > settings.max_request_bytes:
            return (
                f"the job payload is {size} bytes; in-process jobs accept at most "
                f"{settings.max_request_bytes} (limit: PIE_MAX_REQUEST_BYTES)"
            )
    return None
