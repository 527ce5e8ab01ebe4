"""Where a claimed job goes: AWS Lambda, an ECS task, or a registered in-process implementation.

The AWS backends are synchronous (boto3) and run in a thread; they return a small description
of what AWS accepted, or raise :class:`DispatchError`. A dispatched Lambda/ECS job stays
``started`` until its handler reports back through the completion route.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pie.config import Settings

# ECS caps the overrides structure at 8192 characters of JSON, formatting included (the payload
# sits in it as a string, so its quotes and backslashes count twice)
ECS_MAX_OVERRIDES_CHARS = 8192
_ECS_VALUE = re.compile(r"^([A-Za-z0-9_-]{1,255})/([A-Za-z0-9_-]{1,255}(?::[0-9]+)?|arn:aws[a-z-]*:ecs:.+)$")


# AWS answers that no retry can change (the request itself is wrong); anything else, including
# a missing function or cluster (it may be deployed a moment later), is retried with backoff
NOT_RETRYABLE_AWS_CODES = frozenset(
    {"RequestEntityTooLargeException", "InvalidRequestContentException", "InvalidParameterValueException"}
)


class DispatchError(Exception):
    """A dispatch that did not happen. ``retryable`` errors go back to the queue with backoff."""

    def __init__(self, code: str, message: str, *, retryable: bool = True, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = details or {}

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


def callback_url(settings: Settings, model_id: str, model_version: str, job_id: str) -> str:
    base = settings.public_url.rstrip("/")
    return f"{base}/v2/models/{model_id}/versions/{model_version}/jobs/{job_id}/complete"


def build_payload(settings: Settings, job: Any) -> dict[str, Any]:
    """What every handler receives (spec 9.2)."""
    return {
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


_STARTED_BY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


def ecs_started_by(job_id: str) -> str:
    """The RunTask ``startedBy`` tag of a job's task: ECS allows at most 36 letters, numbers,
    '-', '/' and '_' ("pie-" and the 32 hex digits of a job id fit exactly)."""
    return ("pie-" + _STARTED_BY_UNSAFE.sub("", str(job_id).replace("-", "")))[:36]


def _aws_error(exc: Exception, backend: str) -> DispatchError:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or "ClientError"
        return DispatchError(
            "aws_error",
            f"{backend}: {code}: {err.get('Message') or exc}",
            retryable=code not in NOT_RETRYABLE_AWS_CODES,
            details={
                "aws_code": code,
                "http_status": exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                "operation": exc.operation_name,
            },
        )
    if isinstance(exc, BotoCoreError):
        return DispatchError("aws_unreachable", f"{backend}: {exc}", details={"exception": exc.__class__.__name__})
    return DispatchError("dispatch_exception", f"{backend}: {exc}", details={"exception": exc.__class__.__name__})


class AwsBackends:
    """boto3 clients, created once per dispatcher (boto3 clients are thread-safe)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lambda = None
        self._ecs = None

    def _client(self, service: str):
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.settings.aws_region,
            retries={"mode": "standard", "total_max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
        )
        return boto3.session.Session().client(service, endpoint_url=self.settings.aws_endpoint_url, config=config)

    @property
    def lambda_client(self):
        if self._lambda is None:
            self._lambda = self._client("lambda")
        return self._lambda

    @property
    def ecs_client(self):
        if self._ecs is None:
            self._ecs = self._client("ecs")
        return self._ecs

    def invoke_lambda(self, handler: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        arn = handler.get("arn")
        if not isinstance(arn, str) or not arn:
            raise DispatchError("invalid_handler", "lambda handler has no arn", retryable=False)
        kwargs: dict[str, Any] = {
            "FunctionName": arn,
            "InvocationType": "Event",
            "Payload": json.dumps(payload).encode(),
        }
        qualifier = handler.get("version")
        if qualifier:
            kwargs["Qualifier"] = str(qualifier)
        try:
            response = self.lambda_client.invoke(**kwargs)
        except Exception as exc:
            raise _aws_error(exc, "lambda") from exc
        status = response.get("StatusCode")
        if status != 202:
            raise DispatchError("aws_error", f"lambda: Invoke answered {status}, expected 202", details={"http_status": status})
        return {"backend": "lambda", "function": arn, "qualifier": qualifier or None}

    def run_ecs_task(self, handler: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        value = handler.get("value")
        match = _ECS_VALUE.match(value) if isinstance(value, str) else None
        if match is None:
            raise DispatchError("invalid_handler", f"ecs_task handler value {value!r} is not '<cluster>/<task_definition>'", retryable=False)
        cluster, task_definition = match.group(1), match.group(2)
        body = json.dumps(payload, separators=(",", ":"))
        s = self.settings
        overrides = {
            "containerOverrides": [{"name": s.ecs_container_name, "environment": [{"name": s.ecs_payload_env_var, "value": body}]}]
        }
        size = len(json.dumps(overrides, separators=(",", ":")))
        if size > ECS_MAX_OVERRIDES_CHARS:
            raise DispatchError(
                "payload_too_large",
                f"the job payload makes the ECS container overrides {size} characters of JSON; "
                f"ECS allows at most {ECS_MAX_OVERRIDES_CHARS}",
                retryable=False,
                details={"payload_chars": len(body)},
            )
        kwargs: dict[str, Any] = {
            "cluster": cluster,
            "taskDefinition": task_definition,
            "count": 1,
            "startedBy": ecs_started_by(payload["job_id"]),
            "overrides": overrides,
        }
        if s.ecs_launch_type:
            kwargs["launchType"] = s.ecs_launch_type
        if s.ecs_launch_type.upper() == "FARGATE" or s.ecs_subnets:
            vpc: dict[str, Any] = {"subnets": list(s.ecs_subnets), "assignPublicIp": "ENABLED" if s.ecs_assign_public_ip else "DISABLED"}
            if s.ecs_security_groups:
                vpc["securityGroups"] = list(s.ecs_security_groups)
            kwargs["networkConfiguration"] = {"awsvpcConfiguration": vpc}
        try:
            response = self.ecs_client.run_task(**kwargs)
        except Exception as exc:
            raise _aws_error(exc, "ecs") from exc
        failures = response.get("failures") or []
        tasks = response.get("tasks") or []
        if failures or not tasks:
            first = failures[0] if failures else {}
            raise DispatchError(
                "ecs_run_task_failed",
                f"ecs: RunTask placed no task: {first.get('reason') or 'no task returned'}",
                details={"failures": [{k: f.get(k) for k in ("arn", "reason", "detail") if f.get(k)} for f in failures]},
            )
        return {"backend": "ecs_task", "cluster": cluster, "task_definition": task_definition, "task_arn": tasks[0].get("taskArn")}
