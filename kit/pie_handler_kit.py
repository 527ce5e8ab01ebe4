"""pie_handler_kit: write a PIE v2 job handler (an AWS Lambda function or an ECS task) with the
Python standard library only.

One module, no dependencies: ``pip install ./kit`` (the ``pie-handler-kit`` distribution built
from the PIE repository) or copy this file next to your code.

    from pie_handler_kit import HandlerError, lambda_handler, main

    def predict(input, features, job):          # job: ids of the job (a Job)
        if "route" not in (features or {}):
            raise HandlerError("missing_feature", "route is required")
        return {"price": 120}

    handler = lambda_handler(predict)            # Lambda: module.handler
    if __name__ == "__main__":                   # ECS: reads $PIE_JOB_PAYLOAD
        raise SystemExit(main(predict))

The kit reads the payload PIE dispatched (the Lambda event, or the ``PIE_JOB_PAYLOAD``
environment variable of an ECS task), calls your function with ``input``, ``features`` and the
job, and reports the outcome to the payload's ``callback_url`` with its ``callback_token``:
``{"status": "success", "output": ...}`` or ``{"status": "failure", "error": {"code", "message",
...}}``. Transient callback failures (connection errors, time-outs, 408/425/429/5xx) are retried
with exponential backoff and jitter; other answers are final. ``output_schema`` optionally
checks the output against a JSON Schema before it is reported: with ``jsonschema`` when it is
importable (full Draft 2020-12), otherwise with a built-in subset (``type``, ``enum``, ``const``,
``required``, ``properties``, ``additionalProperties``, ``items``, ``prefixItems``,
``min/maxItems``, ``min/maxLength``, ``minimum``/``maximum`` and their exclusive forms,
``allOf``/``anyOf``/``oneOf``/``not``; other keywords are not checked).

Cancellation (``POST /v2/jobs/{job_id}/cancel``) is cooperative: a long handler checks
``job.cancelled()`` (or ``cancelled()``) between steps and stops early, e.g. by raising
:class:`JobCancelled`. In an ECS task run by ``main`` it turns true when the task receives SIGTERM
(PIE stops a cancelled job's task with ``StopTask``; ECS sends SIGTERM, then SIGKILL after the
container's stop timeout); in a PIE in-process handler (``in_process(fn)``) when PIE cancels
the job. A Lambda invocation cannot be stopped: it runs to its end and PIE ignores its report.
PIE answers any report of a cancelled job with 409 ``{"cancelled": true}``: the kit takes that
as the end of the job (status ``cancelled``), not as an error, so Lambda does not retry it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__version__ = "0.2.0"
__all__ = [
    "CallbackError",
    "HandlerError",
    "Job",
    "JobCancelled",
    "PAYLOAD_ENV_VAR",
    "PayloadError",
    "cancelled",
    "check_output",
    "in_process",
    "lambda_handler",
    "main",
    "parse_payload",
    "report",
    "run",
    "watch_sigterm",
]

PAYLOAD_ENV_VAR = "PIE_JOB_PAYLOAD"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
log = logging.getLogger("pie_handler_kit")


class HandlerError(Exception):
    """Raise from your function to fail the job with a structured error."""

    def __init__(self, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def as_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return error


class JobCancelled(Exception):
    """Raise from your function to stop early once ``job.cancelled()`` is true. The kit then
    reports the job ``interrupted`` (PIE ignores the report of a job it cancelled: 409)."""

    def __init__(self, message: str = "the handler stopped early: the job was cancelled or the task asked to stop"):
        super().__init__(message)
        self.message = message


class PayloadError(ValueError):
    """The payload is not a PIE job payload (nothing can be reported: there is no callback)."""


class CallbackError(Exception):
    """PIE did not accept the report (``status`` is None when it could not be reached)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Job:
    """The ids of the job being handled (the rest of the payload is in ``payload``)."""

    job_id: str
    job_type: str
    model_id: str
    model_version: str
    assignment_id: str | None
    client_id: str | None
    domain_id: str | None
    service_id: str | None
    callback_url: str
    callback_token: str | None = field(default=None, repr=False)
    payload: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def cancelled(self) -> bool:
        """True once this job should stop: see :func:`cancelled`."""
        return cancelled()


# -- cancellation --------------------------------------------------------------------------

_stop_requested = threading.Event()


def cancelled() -> bool:
    """True once the job being handled should stop early: the ECS task received SIGTERM
    (``main`` or ``watch_sigterm`` is listening: PIE stops the task of a cancelled job), or, in a
    PIE in-process handler, PIE cancelled the job. Always False in Lambda (an invocation cannot
    be stopped). Cheap: check it between the steps of a long handler."""
    if _stop_requested.is_set():
        return True
    pie = sys.modules.get("pie.dispatch.inprocess")  # running inside PIE (in-process): its flag
    check = getattr(pie, "cancelled", None)
    if callable(check):
        try:
            return bool(check())
        except Exception:
            return False
    return False


def _on_sigterm(signum: int, frame: Any) -> None:
    if not _stop_requested.is_set():
        log.warning("SIGTERM received: the task is asked to stop (cancelled() is now true)")
    _stop_requested.set()


def watch_sigterm() -> Callable[[], None]:
    """Make SIGTERM set :func:`cancelled` instead of ending the process at once (call it in the
    main thread; ``main`` does). Returns a function restoring the previous handler."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


# -- reading the payload -------------------------------------------------------------------


def parse_payload(source: Any) -> tuple[Job, Any, Any]:
    """(job, input, features) from a payload: a dict (a Lambda event), or its JSON text/bytes
    (an ECS environment variable)."""
    if isinstance(source, (bytes, bytearray)):
        source = source.decode("utf-8")
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except ValueError as exc:
            raise PayloadError(f"the job payload is not JSON: {exc}") from None
    if not isinstance(source, Mapping):
        raise PayloadError(f"the job payload must be a JSON object, not {type(source).__name__}")
    missing = [
        k
        for k in ("job_id", "job_type", "model_id", "model_version", "callback_url")
        if not isinstance(source.get(k), str)
    ]
    if missing:
        raise PayloadError(f"not a PIE job payload: missing {', '.join(missing)}")
    token = source.get("callback_token")
    job = Job(
        job_id=source["job_id"],
        job_type=source["job_type"],
        model_id=source["model_id"],
        model_version=source["model_version"],
        assignment_id=source.get("assignment_id"),
        client_id=source.get("client_id"),
        domain_id=source.get("domain_id"),
        service_id=source.get("service_id"),
        callback_url=source["callback_url"],
        callback_token=token if isinstance(token, str) and token else None,
        payload=dict(source),
    )
    return job, source.get("input"), source.get("features")


# -- reporting -----------------------------------------------------------------------------


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def report(
    job: Job,
    status: str,
    *,
    output: Any = None,
    error: Any = None,
    token: str | None = None,
    attempts: int = 6,
    backoff: float = 0.5,
    max_backoff: float = 20.0,
    timeout: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST the outcome to ``job.callback_url`` with the job's callback token (or ``token``).
    Retries transient failures up to ``attempts`` times with exponential backoff and jitter;
    returns PIE's answer (200, or 207 when a triggered subscription failed to dispatch).
    Raises :class:`CallbackError` when PIE refuses the report or stays unreachable."""
    if status not in ("success", "failure"):
        raise ValueError("status is 'success' or 'failure'")
    body: dict[str, Any] = {"status": status}
    if status == "success":
        body["output"] = output
    else:
        body["error"] = error
    data = json.dumps(body, allow_nan=False).encode("utf-8")
    bearer = token or job.callback_token
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"pie-handler-kit/{__version__}",
    }
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    last: CallbackError | None = None
    for attempt in range(1, max(attempts, 1) + 1):
        request = urllib.request.Request(job.callback_url, data=data, headers=headers, method="POST")
        wait: float | None = None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = raw.decode("utf-8", "replace")
            message = answer.get("message") if isinstance(answer, dict) else answer
            last = CallbackError(
                f"PIE answered {exc.code} to the {status} report of job {job.job_id}: {message}", exc.code, answer
            )
            if exc.code not in RETRYABLE_STATUS:
                raise last from None
            wait = _retry_after(exc.headers)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            last = CallbackError(f"cannot reach PIE at {job.callback_url}: {reason}")
        if attempt < attempts:
            ceiling = min(max_backoff, backoff * 2 ** (attempt - 1))
            delay = min(max_backoff, wait) if wait is not None else ceiling / 2 + random.uniform(0, ceiling / 2)
            log.warning("%s; retry %d/%d in %.2fs", last, attempt, attempts - 1, delay)
            sleep(delay)
    assert last is not None
    raise last


# -- output contracts ----------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def _subset_error(schema: Any, value: Any, path: str) -> str | None:
    if schema is True or schema == {}:
        return None
    if schema is False:
        return f"{path}: no value is allowed here"
    if not isinstance(schema, dict):
        return None
    where = path or "output"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return f"{where}: expected {' or '.join(map(str, kinds))}, got {type(value).__name__}"
    if "const" in schema and value != schema["const"]:
        return f"{where}: must be {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: must be one of {schema['enum']!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok in (
            ("minimum", lambda b: value >= b),
            ("maximum", lambda b: value <= b),
            ("exclusiveMinimum", lambda b: value > b),
            ("exclusiveMaximum", lambda b: value < b),
        ):
            if isinstance(schema.get(key), (int, float)) and not ok(schema[key]):
                return f"{where}: {value} violates {key} {schema[key]}"
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            return f"{where}: shorter than {schema['minLength']}"
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            return f"{where}: longer than {schema['maxLength']}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                return f"{where}: {name!r} is required"
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                problem = _subset_error(properties[name], item, f"{path}.{name}" if path else name)
            elif extra is False:
                problem = f"{where}: unexpected property {name!r}"
            else:
                problem = _subset_error(extra, item, f"{path}.{name}" if path else name)
            if problem:
                return problem
    if isinstance(value, list):
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            return f"{where}: fewer than {schema['minItems']} items"
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            return f"{where}: more than {schema['maxItems']} items"
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items", True)
            problem = _subset_error(sub, item, f"{where}[{i}]")
            if problem:
                return problem
    for sub in schema.get("allOf", []):
        if (problem := _subset_error(sub, value, path)) is not None:
            return problem
    if "anyOf" in schema and all(_subset_error(s, value, path) for s in schema["anyOf"]):
        return f"{where}: matches none of anyOf"
    if "oneOf" in schema and sum(_subset_error(s, value, path) is None for s in schema["oneOf"]) != 1:
        return f"{where}: must match exactly one of oneOf"
    if "not" in schema and _subset_error(schema["not"], value, path) is None:
        return f"{where}: must not match the 'not' schema"
    return None


def check_output(output: Any, schema: Any) -> str | None:
    """Why ``output`` does not match the JSON Schema ``schema``, or None. Uses ``jsonschema``
    (Draft 2020-12) when importable, else the built-in subset (see the module docstring)."""
    try:
        import jsonschema  # type: ignore[import-not-found]
    except ImportError:
        return _subset_error(schema, output, "")
    validator = jsonschema.Draft202012Validator(schema)
    best = jsonschema.exceptions.best_match(validator.iter_errors(output))
    if best is None:
        return None
    where = "output" + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in best.absolute_path)
    return f"{where}: {best.message}"


# -- running a handler ---------------------------------------------------------------------

Handler = Callable[[Any, Any, Job], Any]


def _outcome(fn: Handler, job: Job, input: Any, features: Any, output_schema: Any) -> tuple[str, Any, Any]:
    try:
        output = fn(input, features, job)
    except HandlerError as exc:
        return "failure", None, exc.as_error()
    except JobCancelled as exc:
        return "failure", None, {"code": "interrupted", "message": exc.message}
    except Exception as exc:  # the job fails with the exception, it is never lost
        log.exception("handler for job %s raised", job.job_id)
        return (
            "failure",
            None,
            {
                "code": "handler_exception",
                "message": str(exc) or exc.__class__.__name__,
                "exception": exc.__class__.__name__,
            },
        )
    try:
        output = json.loads(json.dumps(output, allow_nan=False))
    except (TypeError, ValueError) as exc:
        return (
            "failure",
            None,
            {"code": "invalid_output", "message": f"the handler returned output that is not JSON: {exc}"},
        )
    if output_schema is not None:
        problem = check_output(output, output_schema)
        if problem is not None:
            return "failure", None, {"code": "output_contract_violation", "message": problem}
    return "success", output, None


def _cancelled_in_pie(exc: CallbackError) -> bool:
    """PIE's answer to a report of a job it cancelled: 409 with ``"cancelled": true``."""
    return exc.status == 409 and isinstance(exc.body, dict) and exc.body.get("cancelled") is True


def run(fn: Handler, payload: Any, *, output_schema: Any = None, **report_options: Any) -> dict[str, Any]:
    """Handle one job: parse ``payload``, call ``fn(input, features, job)``, report the outcome.
    Returns ``{"job_id", "status", "error", "callback"}`` (``callback``: PIE's answer); status
    ``cancelled`` when PIE had cancelled the job (its report was ignored)."""
    job, input, features = parse_payload(payload)
    status, output, error = _outcome(fn, job, input, features, output_schema)
    try:
        answer = report(job, status, output=output, error=error, **report_options)
    except CallbackError as exc:
        if not _cancelled_in_pie(exc):
            raise
        log.info("job %s was cancelled in PIE; its %s report was ignored", job.job_id, status)
        return {"job_id": job.job_id, "status": "cancelled", "error": None, "callback": exc.body}
    log.info("job %s reported %s", job.job_id, status)
    return {"job_id": job.job_id, "status": status, "error": error, "callback": answer}


def lambda_handler(
    fn: Handler, *, output_schema: Any = None, **report_options: Any
) -> Callable[[Any, Any], dict[str, Any]]:
    """A Lambda handler ``(event, context)`` running ``fn`` on the job in the event. A report
    PIE could not take raises, so Lambda's asynchronous retries try again (a repeated report
    of the same outcome is a no-op in PIE)."""

    def handler(event: Any, context: Any = None) -> dict[str, Any]:
        return run(fn, event, output_schema=output_schema, **report_options)

    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


def main(
    fn: Handler,
    *,
    output_schema: Any = None,
    env_var: str = PAYLOAD_ENV_VAR,
    environ: Mapping[str, str] | None = None,
    **report_options: Any,
) -> int:
    """An ECS task entrypoint: run ``fn`` on the payload in ``$PIE_JOB_PAYLOAD``. Exit status
    0 when the outcome (success or failure) was reported, or the job had been cancelled in PIE
    (status ``cancelled``), 1 when it could not be reported, 2 when there is no usable payload.
    While it runs, SIGTERM (ECS stopping the task) makes ``cancelled()`` true."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = (environ if environ is not None else os.environ).get(env_var)
    if not raw:
        log.error("no job payload: the environment variable %s is not set", env_var)
        return 2
    _stop_requested.clear()  # a new task: nothing asked it to stop yet
    restore = watch_sigterm() if threading.current_thread() is threading.main_thread() else None
    try:
        result = run(fn, raw, output_schema=output_schema, **report_options)
    except PayloadError as exc:
        log.error("%s", exc)
        return 2
    except CallbackError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if restore is not None:
            restore()
    print(json.dumps({k: result[k] for k in ("job_id", "status", "error")}), flush=True)
    return 0


def in_process(fn: Handler, *, output_schema: Any = None) -> Callable[[dict[str, Any]], Any]:
    """A PIE in-process implementation (``fn(payload) -> output``; register it under the
    ``pie.handlers`` entry-point group) running ``fn(input, features, job)``: the same handler
    code as for Lambda or ECS. ``job.cancelled()`` turns true when PIE cancels the job; PIE
    records the return value itself (nothing is reported over HTTP). ``HandlerError`` fails the
    job with its structured error; an ``output_schema`` mismatch fails it
    (``output_contract_violation``)."""

    def implementation(payload: dict[str, Any]) -> Any:
        job, input, features = parse_payload(payload)
        failure = getattr(sys.modules.get("pie.dispatch.inprocess"), "HandlerFailure", None)
        try:
            output = fn(input, features, job)
        except HandlerError as exc:
            if failure is None:
                raise
            raise failure(exc.code, exc.message, exc.details) from exc
        if output_schema is not None:
            problem = check_output(output, output_schema)
            if problem is not None:
                if failure is None:
                    raise HandlerError("output_contract_violation", problem)
                raise failure("output_contract_violation", problem)
        return output

    implementation.__name__ = getattr(fn, "__name__", "implementation")
    implementation.__doc__ = getattr(fn, "__doc__", None)
    return implementation
