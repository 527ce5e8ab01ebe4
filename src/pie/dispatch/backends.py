"""Where a claimed job goes: AWS Lambda, an ECS task, or a registered in-process implementation.

The AWS backends are synchronous (boto3) and run in a thread; they return a small description
of what AWS accepted, or raise :class:`DispatchError`. A dispatched Lambda/ECS job stays
``started`` until its handler reports back through the completion route.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
from typing import Any
from urllib.parse import urlsplit

from pie.config import Settings

log = logging.getLogger("pie.dispatch")

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


LOOPBACK_WARNING = (
    "PIE_PUBLIC_URL {url} is a loopback address: a Lambda function or ECS task cannot reach it, "
    "so this job's callback cannot arrive (set PIE_PUBLIC_URL to an address AWS can reach)"
)
_warned_loopback: set[str] = set()


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def public_url_warning(settings: Settings, kind: str | None) -> str | None:
    """The job warning for an AWS dispatch while PIE_PUBLIC_URL is loopback (logged once per
    process and URL), or None."""
    if kind not in ("lambda", "ecs_task") or not is_loopback_url(settings.public_url):
        return None
    warning = LOOPBACK_WARNING.format(url=settings.public_url)
    if settings.public_url not in _warned_loopback:
        _warned_loopback.add(settings.public_url)
        log.warning(
            warning.replace("this job's callback cannot arrive", "callbacks of Lambda and ECS jobs cannot arrive")
        )
    return warning


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

    def __init__(self, settings: Settings, max_connections: int = 10):
        self.settings = settings
        # HTTP connections per client: as many as the dispatcher makes calls at once
        self.max_connections = max_connections
        self._lambda = None
        self._ecs = None
        self._lock = threading.Lock()

    def _client(self, service: str):
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.settings.aws_region,
            retries={"mode": "standard", "total_max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=self.max_connections,
            # the requests are PIE's own (the payload's size is checked here, AWS validates the
            # rest): botocore's client-side validation was ~15% of a call's CPU
            parameter_validation=False,
        )
        return boto3.session.Session().client(service, endpoint_url=self.settings.aws_endpoint_url, config=config)

    # created on first use, once: the first calls of a batch arrive together from many threads
    # (a client costs tens of milliseconds to build)
    @property
    def lambda_client(self):
        if self._lambda is None:
            with self._lock:
                if self._lambda is None:
                    self._lambda = self._client("lambda")
        return self._lambda

    @property
    def ecs_client(self):
        if self._ecs is None:
            with self._lock:
                if self._ecs is None:
                    self._ecs = self._client("ecs")
        return self._ecs

    def invoke_lambda(self, handler: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        arn = handler.get("arn")
        if not isinstance(arn, str) or not arn:
            raise DispatchError("invalid_handler", "lambda handler has no arn", retryable=False)
        problem = payload_limit_problem(self.settings, handler, payload)
        if problem is not None:
            raise DispatchError("payload_too_large", problem, retryable=False)
        kwargs: dict[str, Any] = {
            "FunctionName": arn,
            "InvocationType": "Event",
            "Payload": lambda_payload(payload),
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
            raise DispatchError(
                "aws_error", f"lambda: Invoke answered {status}, expected 202", details={"http_status": status}
            )
        return {"backend": "lambda", "function": arn, "qualifier": qualifier or None}

    def run_ecs_task(self, handler: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        value = handler.get("value")
        match = _ECS_VALUE.match(value) if isinstance(value, str) else None
        if match is None:
            raise DispatchError(
                "invalid_handler",
                f"ecs_task handler value {value!r} is not '<cluster>/<task_definition>'",
                retryable=False,
            )
        cluster, task_definition = match.group(1), match.group(2)
        s = self.settings
        overrides = ecs_overrides(s, payload, ecs_container(s, handler))
        problem = payload_limit_problem(s, handler, payload)
        if problem is not None:
            raise DispatchError(
                "payload_too_large",
                problem,
                retryable=False,
                details={"payload_chars": len(overrides["containerOverrides"][0]["environment"][0]["value"])},
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
            vpc: dict[str, Any] = {
                "subnets": list(s.ecs_subnets),
                "assignPublicIp": "ENABLED" if s.ecs_assign_public_ip else "DISABLED",
            }
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
                details={
                    "failures": [{k: f.get(k) for k in ("arn", "reason", "detail") if f.get(k)} for f in failures]
                },
            )
        return {
            "backend": "ecs_task",
            "cluster": cluster,
            "task_definition": task_definition,
            "task_arn": tasks[0].get("taskArn"),
        }

    def stop_ecs_task(self, cluster: str, task_arn: str, reason: str) -> dict[str, Any]:
        """``StopTask`` (ECS sends the container SIGTERM, then SIGKILL after its stop timeout).
        Raises :class:`DispatchError`; a task ECS does not know (any more) is not retryable."""
        try:
            response = self.ecs_client.stop_task(cluster=cluster, task=task_arn, reason=reason[:255])
        except Exception as exc:
            error = _aws_error(exc, "ecs")
            if error.details.get("aws_code") in ("InvalidParameterException", "ClusterNotFoundException"):
                error.retryable = False
            raise error from exc
        task = response.get("task") or {}
        return {"task_arn": task.get("taskArn", task_arn), "last_status": task.get("lastStatus")}
