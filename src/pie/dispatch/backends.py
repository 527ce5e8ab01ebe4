"""Where a claimed job goes: AWS Lambda, an ECS task, or a registered in-process implementation.

The AWS backends are synchronous (boto3) and run in a thread; they return a small description
of what AWS accepted, or raise :class:`DispatchError`. A dispatched Lambda/ECS job stays
``started`` until its handler reports back through the completion route.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from typing import Any
from urllib.parse import urlsplit

from pie.config import Settings
from pie.jobs.payload import ecs_container, ecs_overrides, lambda_payload, payload_limit_problem

log = logging.getLogger("pie.dispatch")

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
